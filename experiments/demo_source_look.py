"""The pseudo-label pass in the source's look (``pseudo_labels.isa``,
docs/method.md §6) on a demo run's source model: round 1's pseudo-label
accuracy on the target *train* labels, with a plain pass and with the pass on
target images translated towards the source's look, for several FDA betas.

    python experiments/demo_source_look.py --run runs/demo   # after make demo
    -> experiments/results/demo_source_look.{json,md}
"""
import argparse
import json
import os
import sys
import tempfile

import torch

from drsl_fast.train.checkpoint import config_digest, load_weights
from drsl_fast.train.config import load_config, read_yaml
from drsl_fast.train.label_pass import make_pseudo_labels
from drsl_fast.train.log import quiet_log
from drsl_fast.train.network import seeded_network
from drsl_fast.train.runtime import start
from drsl_fast.train.settings import Settings


def variant(config: dict, scratch: str, beta) -> Settings:
    """The run's settings with a plain pass (``beta`` None) or a source-look pass at ``beta``."""
    return Settings.of(dict(config, output_dir=scratch,
                            pseudo_labels=dict(config["pseudo_labels"], isa=beta is not None),
                            isa=dict(config["isa"], fda_beta=config["isa"]["fda_beta"] if beta is None else beta)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/demo", help="a demo run with a finished source stage")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.01, 0.03, 0.05])
    parser.add_argument("--out", default="experiments/results/demo_source_look", help="results path without extension")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_config(os.path.join(args.run, "config.yaml"),
                         ["train.progress=false", f"train.threads={args.threads}"])
    settings = Settings.of(config)
    runtime = start(settings.device, settings.train)
    network = seeded_network(settings, lambda line: None)
    load_weights(network, os.path.join(args.run, "source", "model.pt"), map_location="cpu",
                 digest=config_digest(read_yaml(os.path.join(args.run, "config.yaml"))))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for beta in [None, *args.betas]:
            directory = os.path.join(scratch, str(beta))
            summary = make_pseudo_labels(runtime, variant(config, scratch, beta), network, directory, 0, quiet_log())
            rows.append({"pass": "plain" if beta is None else f"source look, beta {beta}", "beta": beta,
                         "portion": summary["portion"], "accuracy": 100 * summary["accuracy"]})
    command = "python experiments/demo_source_look.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# Round 1's pseudo-labels in the source's look\n\n`{command}`: the source model of a demo run "
             f"(seed {settings.seed}), accuracy on the target train labels.\n",
             "| pass | portion | pseudo-label accuracy |", "|---|---|---|"]
    lines += [f"| {r['pass']} | {r['portion']:.2f} | {r['accuracy']:.1f} % |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out + ".json", "w", encoding="utf-8") as handle:
        json.dump({"command": command, "run": args.run, "seed": settings.seed, "rows": rows}, handle, indent=1)
    with open(args.out + ".md", "w", encoding="utf-8") as handle:
        handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
