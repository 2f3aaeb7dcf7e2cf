"""The ``drsl`` command line. Subcommands:

drsl run      [--config NAME|FILE] [--resume] [key=value ...]
    the whole DRSL pipeline: source training, pseudo-label rounds, DRSL and
    DRSL+ adaptation, evaluation (configs: gta5, synthia, demo; see
    ``drsl config``). Under torchrun every stage runs data-parallel.
drsl source | adapt | evaluate   [--config ...] [key=value ...]
    one stage of the run in output_dir (adapt needs the source model;
    evaluate writes the tables, plot and panels of what is finished).
drsl intrada  [--config ...] [--resume] [key=value ...]
    IntraDA (docs/method.md §7) on the run in output_dir: the source model (trained
    first when missing), ADVENT inter-domain adaptation, entropy ranking into
    easy/hard splits, intra-domain adaptation, evaluation beside the finished
    DRSL methods (settings: intrada.*; ``drsl run adaptation.methods=[drsl,
    drsl_plus,intrada]`` runs it beside DRSL in one go).
drsl evaluate --weights FILE [...] [key=value ...]   evaluates model files on target val.
drsl config   [--config ...] [key=value ...]   prints the resolved config.
drsl predict  --weights FILE --out DIR [--config ...] INPUT... [key=value ...]
    a model file on one's own images (files, folders, globs; any size):
    uint8 train-id PNGs, Cityscapes colours, overlays with a legend and,
    with predict.map, confidence or entropy maps (settings predict.*,
    inference.*; the model's settings come from the file where it has them).
    Exit code 1 when some images could not be read (each named on stderr).
drsl data synth --out DIR [--seed S] [--n-source N] [--n-target-train N]
                [--n-target-val N] [--source-size WxH] [--target-size WxH]
    writes the built-in synthetic domain pair (drsl_fast.data.synthetic):
    DIR/source in the GTA5 layout, DIR/target in the Cityscapes layout.
drsl data translate --out DIR [--config ...] [key=value ...]
    writes the source training images translated by FDA (docs/method.md §6,
    beta: isa.fda_beta), each towards a target training image drawn from the
    seed, to DIR under the same names: data.source.translated_root=DIR.

Before anything runs, the resolved config is checked in full (types, ranges,
choices; see drsl_fast/train/schema.py) and so are the files and directories the
command reads and the device; ``drsl config`` checks the config but not the
paths. A bad config, path, device or output_dir, or an unusable model file,
ends the command with one line ``drsl <command>: <message>`` on stderr and
exit code 2; ``--debug`` (or DRSL_DEBUG=1 in the environment) shows the
traceback instead. A start that failed leaves nothing that blocks the
corrected command.
"""

import argparse
import os
import re
import sys
import time
from typing import List, Optional, Tuple

from .data.synthetic import SyntheticPairConfig, make_synthetic_pair

OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")


def image_size(text: str) -> Tuple[int, int]:
    """'WxH' -> (W, H)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    if width < 16 or height < 16:
        raise argparse.ArgumentTypeError(f"image size must be at least 16x16, got {text!r}")
    return width, height


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {text!r}")
    return value


def add_config_arguments(command: argparse.ArgumentParser, example: str, metavar: str = "key=value",
                         what: str = "config overrides") -> None:
    """--config, key=value overrides and --debug, the arguments of every command that reads a config."""
    command.add_argument("--config", default="demo", help="built-in config name or YAML file (default: demo)")
    command.add_argument("overrides", nargs="*", metavar=metavar, help=f"{what}, e.g. {example}")
    command.add_argument("--debug", action="store_true", default=os.environ.get("DRSL_DEBUG") == "1",
                         help="show the traceback of an error (default: DRSL_DEBUG=1 in the environment)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drsl", description="DRSL domain adaptation for semantic segmentation")
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    defaults = SyntheticPairConfig()
    synth = data.add_parser("synth", help="write the built-in synthetic source/target pair")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--seed", type=int, default=defaults.seed)
    synth.add_argument("--n-source", type=non_negative, default=defaults.n_source)
    synth.add_argument("--n-target-train", type=non_negative, default=defaults.n_target_train)
    synth.add_argument("--n-target-val", type=non_negative, default=defaults.n_target_val)
    synth.add_argument("--source-size", type=image_size, default=defaults.source_size, metavar="WxH")
    synth.add_argument("--target-size", type=image_size, default=defaults.target_size, metavar="WxH")
    synth.set_defaults(handler=run_data_synth)
    translate = data.add_parser("translate",
                                help="write FDA-translated source training images (ISA, docs/method.md §6)")
    translate.add_argument("--out", required=True, help="output directory (then data.source.translated_root=DIR)")
    add_config_arguments(translate, "isa.fda_beta=0.05")
    translate.set_defaults(handler=run_data_translate)

    predict = commands.add_parser("predict", help="a model file on one's own images: label, colour and overlay PNGs")
    predict.add_argument("--weights", required=True, help="the model file (model.pt)")
    predict.add_argument("--out", required=True, help="output directory")
    add_config_arguments(predict, "photos/ 'shots/*.jpg' predict.tta=true", "INPUT | key=value",
                         "image files, folders (searched recursively) and glob patterns; config overrides")
    predict.set_defaults(handler=run_predict)

    for name, help_text in (
        ("run", "all stages: source training, pseudo-label rounds, adaptation, evaluation"),
        ("source", "stage 1: source training with MMDL-FR (Eq. 8)"),
        ("adapt", "stages 2-3: pseudo-label rounds and DRSL / DRSL+ adaptation"),
        ("evaluate", "stage 4: evaluation tables, plot and panels (or of --weights files)"),
        ("intrada", "IntraDA (docs/method.md §7): ADVENT inter-domain adaptation, entropy ranking, "
                    "intra-domain adaptation"),
        ("config", "print the resolved config"),
    ):
        command = commands.add_parser(name, help=help_text)
        add_config_arguments(command, "seed=1")
        if name in ("run", "intrada"):
            command.add_argument("--resume", action="store_true", help="continue the run in output_dir")
        if name == "evaluate":
            command.add_argument("--weights", nargs="+", default=None, help="model files (model.pt) to evaluate")
        command.set_defaults(handler=run_pipeline_command, stage=name)
    return parser


def failed(command: str, error: Exception) -> int:
    """A bad command line: one line on stderr, exit code 2."""
    message = " ".join(str(error).splitlines())
    print(f"drsl {command}: {message}", file=sys.stderr)
    return 2


def split_weights(args: argparse.Namespace) -> None:
    """``--weights a.pt b.pt seed=1``: argparse gives ``seed=1`` to --weights;
    an entry of the form key=value that is not a file is an override."""
    weights = getattr(args, "weights", None) or []
    overrides = [w for w in weights if OVERRIDE.match(w) and not os.path.isfile(w)]
    if overrides:
        args.weights = [w for w in weights if w not in overrides]
        args.overrides = list(args.overrides) + overrides


def run_pipeline_command(args: argparse.Namespace) -> int:
    import yaml

    from .train.config import ConfigError, load_config

    split_weights(args)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        if args.debug:
            raise
        return failed(args.stage, exc)
    if args.stage == "config":
        print(yaml.safe_dump(config, sort_keys=False), end="")
        return 0
    from .train.commands import EXPECTED_ERRORS, execute

    try:
        return execute(args.stage, config, resume=getattr(args, "resume", False),
                       weights=getattr(args, "weights", None))
    except EXPECTED_ERRORS as exc:
        if args.debug:
            raise
        return failed(args.stage, exc)


def run_predict(args: argparse.Namespace) -> int:
    """``drsl predict``: the positional arguments are images, folders and globs,
    and key=value overrides (an existing file of that form is an image)."""
    from .train.commands import EXPECTED_ERRORS
    from .train.config import load_config
    from .train.predict import predict

    overrides = [a for a in args.overrides if OVERRIDE.match(a) and not os.path.exists(a)]
    inputs = [a for a in args.overrides if a not in overrides]
    try:
        return predict(load_config(args.config, overrides), args.weights, inputs, args.out)
    except EXPECTED_ERRORS as exc:
        if args.debug:
            raise
        return failed("predict", exc)


def run_data_synth(args: argparse.Namespace) -> int:
    config = SyntheticPairConfig(
        seed=args.seed,
        n_source=args.n_source,
        n_target_train=args.n_target_train,
        n_target_val=args.n_target_val,
        source_size=args.source_size,
        target_size=args.target_size,
    )
    start = time.perf_counter()
    try:
        roots = make_synthetic_pair(args.out, config)
    except OSError as exc:
        return failed("data synth", f"--out: cannot write {exc.filename or args.out!r}: {exc.strerror}")
    print(
        f"synthetic pair (seed {config.seed}) written in {time.perf_counter() - start:.1f} s: "
        f"source {config.n_source} images at {roots['source']} (GTA5 layout), "
        f"target {config.n_target_train} train + {config.n_target_val} val at {roots['target']} (Cityscapes layout)"
    )
    return 0


def run_data_translate(args: argparse.Namespace) -> int:
    from .train.commands import EXPECTED_ERRORS
    from .train.config import load_config
    from .train.isa import translate_to_disk
    from .train.settings import Settings

    start = time.perf_counter()
    try:
        config = load_config(args.config, args.overrides)
        settings = Settings.of(config)
        count = translate_to_disk(settings.data, settings.seed, settings.isa.fda_beta, args.out)
    except EXPECTED_ERRORS as exc:
        if args.debug:
            raise
        return failed("data translate", exc)
    print(f"{count} source images translated by FDA (beta {settings.isa.fda_beta}, seed {settings.seed}) "
          f"in {time.perf_counter() - start:.1f} s to {args.out}; use data.source.translated_root={args.out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
