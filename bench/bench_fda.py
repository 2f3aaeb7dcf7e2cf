"""Cost of on-the-fly ISA (docs/method.md §6: FDA of a batch's source images,
``drsl_fast.train.isa.translate_batch``) beside one DRSL+ adaptation step of
the demo config (ResNet-18 at width 1/4, 8 source + 8 target 64x64 crops,
forward, every Eq. 10 loss, backward, SGD), on random images and labels.
Prints the median milliseconds of each on this machine's default device and
writes them to bench/results/fda_<device>.{json,csv,md}.

    python bench/bench_fda.py [--config demo] [--repeats 20] [--threads 1 2]
"""
import argparse
import os
import statistics
import sys
import time

import torch

from drsl_fast.train.config import load_config
from drsl_fast.train.data import normalization
from drsl_fast.train.isa import translate_batch
from drsl_fast.train.loop import drsl_loss, step_loss
from drsl_fast.train.network import build_network
from drsl_fast.train.settings import Settings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def median_ms(function, repeats: int, device: torch.device) -> float:
    function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                        help="torch CPU thread counts to measure (default: torch's)")
    parser.add_argument("--out", default=None, help="output stem (default bench/results/fda_<device>)")
    args = parser.parse_args()
    settings = Settings.of(load_config(args.config, []))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    batch, (height, width) = settings.adaptation.batch_size, settings.data.crop
    classes = settings.data.num_classes

    def images() -> dict:
        labels = torch.randint(0, classes, (batch, height, width), device=device)
        return {"image": torch.randn(batch, 3, height, width, device=device), "label": labels,
                "embedding_label": labels[:, ::2, ::2].contiguous()}

    source, target = images(), images()
    source.update(isa_target=torch.randn_like(source["image"]), isa=torch.ones(batch, dtype=torch.bool, device=device))
    network = build_network(settings.model, classes, log=lambda *_: None).to(device).train()
    optimizer = torch.optim.SGD(network.parameter_groups(5e-5), lr=5e-5, momentum=0.9)
    loss_fn = drsl_loss(settings.loss, classes, settings.model.sigma, consistency=True)

    def step() -> None:
        total, _ = step_loss(network, network, loss_fn, source, target, torch.Generator(device).manual_seed(0))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    beta, norm = settings.isa.fda_beta, normalization(settings.data)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        isa_ms = median_ms(lambda: translate_batch(source, beta, norm), args.repeats, device)
        step_ms = median_ms(step, args.repeats, device)
        rows.append({"threads": threads, "images": batch, "height": height, "width": width, "beta": beta,
                     "fda_ms": round(isa_ms, 3), "step_ms": round(step_ms, 2),
                     "share_pct": round(100 * isa_ms / step_ms, 2)})
        print(f"{args.config} on {device} ({threads} threads): ISA (FDA, beta {beta}) of {batch} source "
              f"images {height}x{width}: {isa_ms:.2f} ms; one adaptation step: {step_ms:.1f} ms "
              f"({100 * isa_ms / step_ms:.1f} %)")
    table = harness.markdown_table(["threads", "FDA of a batch, ms", "DRSL+ step, ms", "share %"],
                                   [(r["threads"], r["fda_ms"], r["step_ms"], r["share_pct"]) for r in rows])
    stem = args.out or os.path.join(harness.RESULTS_DIR, f"fda_{device.type}")
    harness.write_results(stem, harness.metadata(device.type, config=args.config), rows, list(rows[0]),
                          "On-the-fly ISA (FDA) against a DRSL+ adaptation step",
                          f"{batch} source images of {height}x{width}, beta {beta}, {args.config} config; medians of "
                          f"{args.repeats} repeats.\n\n{table}")


if __name__ == "__main__":
    main()
