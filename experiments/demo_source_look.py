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

from drsl_fast.train.label_pass import make_pseudo_labels
from drsl_fast.train.log import quiet_log
from drsl_fast.train.settings import Settings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo_runs  # noqa: E402


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
    config, settings, runtime = demo_runs.open_run(args.run, args.threads)
    network = demo_runs.trained_stage(args.run, "source", settings)
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
