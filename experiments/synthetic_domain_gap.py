"""Domain gap of the built-in synthetic pair (issue 5): a small source-only
DeepLab-v2 trained on the synthetic source scores clearly lower on the
synthetic target than on held-out source images.

Runs on the CPU in a few minutes:

    nice -n 19 python experiments/synthetic_domain_gap.py

Writes experiments/results/synthetic_domain_gap.json and .md. The mIoU is that of
drsl_fast.evaluation (docs/method.md §9).
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from drsl_fast.data import (
    CITYSCAPES_CLASSES,
    GTA5,
    IGNORE_LABEL,
    TORCHVISION_RGB,
    Cityscapes,
    SyntheticPairConfig,
    TrainTransform,
    make_synthetic_pair,
)
from drsl_fast.evaluation import ConfusionMatrix
from drsl_fast.models import DeepLabV2

NUM_CLASSES = 19


@torch.no_grad()
def evaluate(model: DeepLabV2, dataset) -> torch.Tensor:
    """Per-class IoU over ``dataset`` (predictions upsampled bilinearly to the label size)."""
    model.eval()
    confusion = ConfusionMatrix(NUM_CLASSES, align_corners=False)
    for sample in DataLoader(dataset, batch_size=8):
        confusion.update(model(sample["image"]).logits, sample["label"])
    return confusion.iou()


def train_source_only(model: DeepLabV2, dataset, args) -> list:
    """SGD (momentum 0.9, wd 5e-4, poly 0.9, heads at 10 x lr: docs/method.md §2, §6), from scratch."""
    optimizer = torch.optim.SGD(model.parameter_groups(args.lr), momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, generator=generator)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    losses, step = [], 0
    model.train()
    while step < args.steps:
        for sample in loader:
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * (1 - step / args.steps) ** 0.9
            logits = model(sample["image"]).logits
            logits = F.interpolate(logits, size=sample["label"].shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, sample["label"], ignore_index=IGNORE_LABEL)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if step % 100 == 0:
                print(f"step {step}/{args.steps} loss {sum(losses[-100:]) / 100:.3f}", flush=True)
            if step == args.steps:
                break
    return losses


def iou_table(names, source_iou, target_iou) -> str:
    rows = ["| class | source IoU | target IoU |", "|---|---|---|"]
    for name, s, t in zip(names, source_iou.tolist(), target_iou.tolist()):
        if s == s or t == t:  # skip classes absent from both
            rows.append(f"| {name} | {100 * s:.1f} | {100 * t:.1f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--n-source-train", type=int, default=240)
    parser.add_argument("--n-source-val", type=int, default=60)
    parser.add_argument("--n-target-val", type=int, default=60)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (more threads on a busy CPU can be much slower)"
    )
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    given = list(argv if argv is not None else sys.argv[1:])
    command = " ".join(["nice -n 19 python experiments/synthetic_domain_gap.py"] + given)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as data_dir:
        config = SyntheticPairConfig(
            seed=args.seed,
            n_source=args.n_source_train + args.n_source_val,
            n_target_train=0,
            n_target_val=args.n_target_val,
        )
        start = time.perf_counter()
        roots = make_synthetic_pair(data_dir, config)
        synth_seconds = time.perf_counter() - start

        transform = TrainTransform(crop_size=(args.crop, args.crop))
        source = GTA5(roots["source"], normalization=TORCHVISION_RGB)
        source_train = GTA5(roots["source"], normalization=TORCHVISION_RGB, transform=transform)
        train_set = Subset(source_train, range(args.n_source_train))
        source_val = Subset(source, range(args.n_source_train, len(source)))
        target_val = Cityscapes(roots["target"], "val", normalization=TORCHVISION_RGB)

        model = DeepLabV2(NUM_CLASSES, depth=args.depth, width=args.width)
        start = time.perf_counter()
        losses = train_source_only(model, train_set, args)
        train_seconds = time.perf_counter() - start
        source_iou, target_iou = evaluate(model, source_val), evaluate(model, target_val)

    source_miou = float(source_iou.nanmean()) * 100
    target_miou = float(target_iou.nanmean()) * 100
    result = {
        "source_val_miou": round(source_miou, 2),
        "target_val_miou": round(target_miou, 2),
        "gap": round(source_miou - target_miou, 2),
        "per_class_iou": {
            name: {"source": round(100 * s, 2), "target": round(100 * t, 2)}
            for name, s, t in zip(CITYSCAPES_CLASSES, source_iou.tolist(), target_iou.tolist())
            if s == s or t == t
        },
        "final_train_loss": round(sum(losses[-50:]) / min(50, len(losses)), 4),
        "synthesis_seconds": round(synth_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "config": vars(args) | {"synthetic": {"source_size": config.source_size, "target_size": config.target_size}},
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "device": "cpu"},
    }
    result["config"].pop("out")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "synthetic_domain_gap.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    with open(os.path.join(args.out, "synthetic_domain_gap.md"), "w", encoding="utf-8") as handle:
        handle.write(
            "# Synthetic domain gap (source-only)\n\n"
            f"DeepLab-v2 ResNet-{args.depth} width {args.width}, trained from scratch on "
            f"{args.n_source_train} synthetic source images ({args.steps} SGD steps, batch {args.batch_size}, "
            f"crop {args.crop}, CPU, {train_seconds:.0f} s); evaluated on {args.n_source_val} held-out source "
            f"images and {args.n_target_val} target val images. Command: "
            f"`{command}`\n\n"
            f"| | mIoU |\n|---|---|\n| source (held out) | {source_miou:.1f} |\n"
            f"| target val | {target_miou:.1f} |\n| gap | {source_miou - target_miou:.1f} |\n\n"
            + iou_table(CITYSCAPES_CLASSES, source_iou, target_iou)
            + "\n"
        )
    print(json.dumps({k: result[k] for k in ("source_val_miou", "target_val_miou", "gap", "train_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
