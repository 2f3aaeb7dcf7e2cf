"""Where the demo's self-training gains or loses: round 1 of DRSL from one
source model, trained on different target labels on the same pixels.

    python experiments/demo_label_oracle.py                 # -> experiments/results/demo_label_oracle.{json,md}
    python experiments/demo_label_oracle.py --round-seeds 5 6 key=value ...

The source model and the round-1 pseudo-labels come from one run
(`drsl run --config demo adaptation.rounds=1 "adaptation.methods=[drsl]" isa.probability=0
pseudo_labels.isa=false`, seed 0).
Then, for each variant and each round seed (sample order and loss sampling of
the round; the source model stays the same), the round is run again on:

  none        no target labels: continued source training (the control)
  pseudo      the class-balanced pseudo-labels, what DRSL trains on
  drop_wrong  the pseudo-labels with the wrong ones removed (set to ignore)
  fix_wrong   the pseudo-labels with the wrong ones replaced by the ground truth

Wrong means different from the target training ground truth where that is
known; pixels the ground truth ignores (the ego-vehicle hood) keep their
pseudo-label. ``drop_wrong`` shows what the correct pseudo-labels alone are
worth, ``fix_wrong`` what the same pixels are worth when the model's confident
mistakes are corrected: what self-training cannot do by itself.
"""
import argparse
import json
import os
import shutil
import statistics
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo_runs  # noqa: E402

VARIANTS = ("none", "pseudo", "drop_wrong", "fix_wrong")
IGNORE = 255
PROTOCOL = "19"


def round_one(output_dir: str, seed: int, overrides) -> dict:
    """The demo's source stage and one DRSL round (results.json)."""
    return demo_runs.run_demo(output_dir, seed, ["adaptation.rounds=1", "adaptation.methods=[drsl]", "isa.probability=0",
                                                 "pseudo_labels.isa=false", *overrides])


def relabel(pseudo: np.ndarray, truth: np.ndarray, variant: str) -> np.ndarray:
    """The labels a variant trains on, from the pseudo-labels and the ground truth."""
    wrong = (pseudo != IGNORE) & (truth != IGNORE) & (pseudo != truth)
    if variant == "none":
        return np.full_like(pseudo, IGNORE)
    if variant == "pseudo":
        return pseudo
    if variant == "drop_wrong":
        return np.where(wrong, IGNORE, pseudo).astype(np.uint8)
    if variant == "fix_wrong":
        return np.where(wrong, truth, pseudo).astype(np.uint8)
    raise ValueError(variant)


def prepare_round(base: str, out: str, variant: str, config: dict) -> dict:
    """``out`` with ``base``'s finished source stage and its round-1 labels
    rewritten for ``variant``; returns the labels' coverage and accuracy."""
    from drsl_fast.train.data import pseudo_label_path, target_dataset
    from drsl_fast.train.settings import Settings
    from drsl_fast.train.label_pass import DIRECTORY, SUMMARY

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(os.path.join(base, "source"), os.path.join(out, "source"))
    source_round, round_dir = os.path.join(base, "drsl", "round_1"), os.path.join(out, "drsl", "round_1")
    os.makedirs(os.path.join(round_dir, DIRECTORY))
    counts = np.zeros(3, np.int64)  # selected, selected with known truth, correct
    truth_set = target_dataset(Settings.of(config).data, "train", with_labels=True)
    for index in range(len(truth_set)):
        sample = truth_set[index]
        truth = sample["label"].numpy().astype(np.int64)
        pseudo = np.asarray(Image.open(pseudo_label_path(os.path.join(source_round, DIRECTORY), sample["name"])))
        labels = relabel(pseudo, truth, variant)
        selected, known = labels != IGNORE, truth != IGNORE
        counts += [selected.sum(), (selected & known).sum(), (selected & known & (labels == truth)).sum()]
        Image.fromarray(labels).save(pseudo_label_path(os.path.join(round_dir, DIRECTORY), sample["name"]))
    with open(os.path.join(source_round, SUMMARY), encoding="utf-8") as handle:
        summary = json.load(handle)
    pixels = len(truth_set) * truth.size
    summary.update(coverage=float(counts[0] / pixels),
                   accuracy=float(counts[2] / counts[1]) if counts[1] else None, oracle_variant=variant)
    with open(os.path.join(round_dir, SUMMARY), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    return {"coverage": summary["coverage"], "accuracy": summary["accuracy"]}


def class_shares(base: str, config: dict) -> dict:
    """Percent of the target training pixels per class: in the ground truth
    (ignored pixels left out) and in the source model's predictions."""
    from drsl_fast.train.data import target_dataset
    from drsl_fast.train.settings import Settings
    from drsl_fast.train.label_pass import SUMMARY, class_names

    names = class_names(config["data"]["num_classes"])
    truth_set = target_dataset(Settings.of(config).data, "train", with_labels=True)
    counts = np.zeros(IGNORE + 1, np.int64)
    for index in range(len(truth_set)):
        counts += np.bincount(truth_set[index]["label"].numpy().ravel(), minlength=IGNORE + 1)
    with open(os.path.join(base, "drsl", "round_1", SUMMARY), encoding="utf-8") as handle:
        predicted = json.load(handle)["predicted_pixels"]
    known, total = counts[:len(names)].sum(), sum(predicted.values())
    return {"truth": {n: 100 * counts[c] / known for c, n in enumerate(names)},
            "predicted": {n: 100 * predicted[n] / total for n in names}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--runs-dir", default="runs/label_oracle")
    parser.add_argument("--out", default=os.path.join(demo_runs.RESULTS_DIR, "demo_label_oracle"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    from drsl_fast.train.config import read_yaml

    base = os.path.join(args.runs_dir, "base")
    shutil.rmtree(base, ignore_errors=True)
    source = round_one(base, 0, args.overrides)
    config = read_yaml(os.path.join(base, "config.yaml"))
    rows = []
    for variant in args.variants:
        for seed in args.round_seeds:
            out = os.path.join(args.runs_dir, f"{variant}_seed_{seed}")
            labels = prepare_round(base, out, variant, config)
            result = round_one(out, seed, args.overrides)["methods"]["DRSL"][0]
            miou, classes = result["miou"], result["evaluation"][PROTOCOL]["classes"]
            rows.append(dict(variant=variant, round_seed=seed, miou=miou, classes=classes, **labels))
            print(f"{variant} seed {seed}: mIoU {miou:.1f}", flush=True)

    source_miou = source["source_only"]["miou"]
    source_classes = source["source_only"]["evaluation"][PROTOCOL]["classes"]
    shares = class_shares(base, config)
    lines = ["| target labels | coverage % | accuracy % | mIoU after round 1 (mean ± std) | minus source only |",
             "|---|---|---|---|---|"]
    summary = {}
    for variant in args.variants:
        mine = [r for r in rows if r["variant"] == variant]
        values = [r["miou"] for r in mine]
        mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        summary[variant] = {"mean": mean, "std": std}
        accuracy = "-" if mine[0]["accuracy"] is None else f"{100 * mine[0]['accuracy']:.1f}"
        lines.append(f"| {variant} | {100 * mine[0]['coverage']:.1f} | {accuracy} | "
                     f"{mean:.1f} ± {std:.1f} | {mean - source_miou:+.1f} |")
    present = [name for name, value in source_classes.items() if value == value]  # NaN: absent from val
    class_lines = ["| class | share of target train pixels % | share predicted by the source model % | "
                   "IoU source only | " + " | ".join(f"IoU {v}" for v in args.variants) + " |",
                   "|---" * (4 + len(args.variants)) + "|"]
    for name in present:
        means = [statistics.mean(r["classes"][name] for r in rows if r["variant"] == v) for v in args.variants]
        class_lines.append(f"| {name} | {shares['truth'][name]:.1f} | {shares['predicted'][name]:.1f} | "
                           f"{source_classes[name]:.1f} | " + " | ".join(f"{m:.1f}" for m in means) + " |")
    command = " ".join(["python", "experiments/demo_label_oracle.py", *sys.argv[1:]])
    text = (f"# Demo label oracle\n\nRound 1 of DRSL from one source model (seed 0, source only: "
            f"{source_miou:.1f} mIoU on the synthetic target val split), trained on different target labels; "
            f"round seeds {args.round_seeds}. `{command}`\n\n" + "\n".join(lines) + "\n\n"
            "Per class: how often it occurs in the target training ground truth and in the source model's "
            "predictions there (the pseudo-labels take a portion of each predicted class), and its IoU on "
            "target val, mean over the round seeds:\n\n" + "\n".join(class_lines) + "\n")
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w", encoding="utf-8") as handle:
        json.dump({"source_only": source_miou, "source_only_classes": source_classes, "class_shares": shares,
                   "rows": rows, "summary": summary, "command": command}, handle, indent=1)
    with open(args.out + ".md", "w", encoding="utf-8") as handle:
        handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
