"""The type and range of every config key, checked once on the resolved config.

:data:`SCHEMA` maps each dotted key of ``defaults.yaml`` (and the fields of
``data.synthetic``) to a :class:`Rule`: what the key accepts, said in words
for the error message. Integers must be YAML integers (``2``, not ``2.0``),
booleans YAML booleans (``true``, not ``'true'``); a number may be given as an
integer. A section whose rule accepts null (``data.synthetic``) is switched
off by setting it to null.

:func:`validate` checks types, ranges and the settings that depend on each
other; :func:`check_paths` checks that the files and directories a run reads
exist. Both raise :class:`ConfigError` with one line, ``<key>: expected
<what>, got <value>``.
"""
import json
import math
import os
import re
from dataclasses import fields
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

from drsl_fast.data.synthetic import DomainStyle

INTRADA = "intrada"  # the method name of docs/method.md §7 in adaptation.methods


class ConfigError(ValueError):
    """A config file, override or path that does not fit the schema (the message is one line)."""


class Rule(NamedTuple):
    what: str                        # the accepted values, in words
    accepts: Callable[[Any], bool]


def shown(value: Any) -> str:
    """A value as the user wrote it in YAML (null, true, "text", [1, 2])."""
    return json.dumps(value, default=str)


def mismatch(key: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {what}, got {shown(value)}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(low: int, high: Optional[int] = None) -> Rule:
    """An integer in [low, high]."""
    what = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return Rule(what, lambda v: is_int(v) and v >= low and (high is None or v <= high))


def number(low: float, high: Optional[float] = None, low_open: bool = False) -> Rule:
    """A finite number >= low (> low when ``low_open``) and <= high."""
    bound = f"> {low}" if low_open else f">= {low}"
    what = f"a number {bound}" if high is None else f"a number in {'(' if low_open else '['}{low}, {high}]"
    return Rule(what, lambda v: is_number(v) and (v > low if low_open else v >= low) and (high is None or v <= high))


def positive() -> Rule:
    return number(0, low_open=True)


def probability() -> Rule:
    return number(0, 1)


BOOLEAN = Rule("true or false", lambda v: isinstance(v, bool))
PATH = Rule("a path", lambda v: isinstance(v, str) and v.strip() != "")
NAME = Rule("a name", lambda v: isinstance(v, str) and v.strip() != "")
SECTION = Rule("a section of keys", lambda v: isinstance(v, dict))


def choice(*values: Any) -> Rule:
    return Rule("one of " + ", ".join(map(shown, values)), lambda v: any(v == c and type(v) is type(c) for c in values))


def optional(rule: Rule) -> Rule:
    """The rule or null."""
    return Rule(f"null or {rule.what}", lambda v: v is None or rule.accepts(v))


def pair(of: Rule, names: str) -> Rule:
    """A list of two values, e.g. [H, W]."""
    return Rule(f"a list [{names}] of two values, each {of.what}",
                lambda v: isinstance(v, list) and len(v) == 2 and all(of.accepts(x) for x in v))


def unique_list(of: Rule) -> Rule:
    """A non-empty list without repeats."""
    return Rule(f"a non-empty list without repeats, each {of.what}",
                lambda v: isinstance(v, list) and 0 < len(v) == len({shown(x) for x in v})
                and all(of.accepts(x) for x in v))


def device_name(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is not None


STYLE_FIELDS = sorted(field.name for field in fields(DomainStyle))
TARGET_STYLE = Rule(f"null or a mapping of DomainStyle fields ({', '.join(STYLE_FIELDS)})",
                    lambda v: v is None or isinstance(v, dict) and set(v) <= set(STYLE_FIELDS))

SCHEMA: Dict[str, Rule] = {
    "config_name": optional(NAME),
    "seed": integer(0),
    "device": Rule("auto, cpu, cuda or cuda:N", device_name),
    "output_dir": PATH,
    "dry_run": BOOLEAN,

    "data": SECTION,
    "data.num_classes": choice(19, 16),
    "data.source": SECTION,
    "data.source.kind": choice("gta5", "synthia"),
    "data.source.root": PATH,
    "data.source.list_file": optional(PATH),
    "data.source.translated_root": optional(PATH),
    "data.target": SECTION,
    "data.target.root": PATH,
    "data.target.train_split": choice("train", "val", "test"),
    "data.target.val_split": choice("train", "val", "test"),
    "data.synthetic": optional(SECTION),
    "data.synthetic.seed": integer(0),
    "data.synthetic.n_source": integer(1),
    "data.synthetic.n_target_train": integer(1),
    "data.synthetic.n_target_val": integer(1),
    "data.synthetic.source_size": pair(integer(16), "W, H"),
    "data.synthetic.target_size": pair(integer(16), "W, H"),
    "data.synthetic.target_style": TARGET_STYLE,
    "data.synthetic_root": optional(PATH),
    "data.source_size": pair(integer(1), "H, W"),
    "data.target_size": pair(integer(1), "H, W"),
    "data.crop": pair(integer(1), "H, W"),
    "data.normalization": choice("caffe_bgr", "torchvision_rgb"),
    "data.scale_range": pair(positive(), "low, high"),
    "data.flip": BOOLEAN,
    "data.colour_jitter": number(0),
    "data.workers": integer(0),
    "data.eval_batch_size": integer(1),

    "isa": SECTION,
    "isa.probability": probability(),
    "isa.fda_beta": number(0, 0.5),
    "isa.stages": choice("source", "adaptation", "both"),

    "model": SECTION,
    "model.depth": choice(18, 34, 50, 101, 152),
    "model.width": positive(),
    "model.init_weights": optional(PATH),
    "model.checkpointing": BOOLEAN,
    "model.head_as_gemm": BOOLEAN,
    "model.mmdl": BOOLEAN,
    "model.num_modes": integer(1),
    "model.embedding_dim": integer(1),
    "model.sigma": positive(),

    "loss": SECTION,
    "loss.samples_per_class": integer(1),
    "loss.alpha": number(0),
    "loss.scale": positive(),
    "loss.beta": number(0),
    "loss.lambda1": number(0),
    "loss.lambda2": number(0),
    "loss.lambda3": number(0),

    "optim": SECTION,
    "optim.momentum": probability(),
    "optim.weight_decay": number(0),
    "optim.poly_power": number(0),

    "source": SECTION,
    "source.iterations": integer(1),
    "source.batch_size": integer(1),
    "source.lr": positive(),

    "pseudo_labels": SECTION,
    "pseudo_labels.portion_start": number(0, 1, low_open=True),
    "pseudo_labels.portion_step": probability(),
    "pseudo_labels.portion_max": number(0, 1, low_open=True),
    "pseudo_labels.mantissa_bits": integer(0, 16),
    "pseudo_labels.batch_size": integer(1),
    "pseudo_labels.isa": BOOLEAN,
    "pseudo_labels.tta": BOOLEAN,

    "adaptation": SECTION,
    "adaptation.methods": unique_list(choice("source_isa", "no_pseudo_labels", "self_training", "drsl", "drsl_plus",
                                             INTRADA)),
    "adaptation.rounds": integer(1),
    "adaptation.epochs_per_round": positive(),
    "adaptation.batch_size": integer(1),
    "adaptation.lr": positive(),
    "adaptation.poly": BOOLEAN,

    "evaluation": SECTION,
    "evaluation.protocol": choice("19", "16", "13"),
    "evaluation.panels": integer(0),
    "evaluation.max_images": optional(integer(1)),
    "evaluation.tta": BOOLEAN,

    "inference": SECTION,
    "inference.scales": unique_list(positive()),
    "inference.flip": BOOLEAN,
    "inference.window": optional(pair(integer(1), "H, W")),
    "inference.overlap": Rule("a number in [0, 1)", lambda v: is_number(v) and 0 <= v < 1),

    "predict": SECTION,
    "predict.tta": BOOLEAN,
    "predict.resize": BOOLEAN,
    "predict.map": choice("none", "confidence", "entropy"),
    "predict.overlay_alpha": probability(),

    "train": SECTION,
    "train.amp": choice("auto", "off", "fp16", "bf16"),
    "train.checkpoint_every": integer(1),
    "train.log_every": integer(1),
    "train.tensorboard": BOOLEAN,
    "train.progress": BOOLEAN,
    "train.threads": optional(integer(1)),

    "intrada": SECTION,
    "intrada.inter_iterations": integer(1),
    "intrada.intra_iterations": integer(1),
    "intrada.batch_size": integer(1),
    "intrada.lr": positive(),
    "intrada.poly": BOOLEAN,
    "intrada.poly_iterations": optional(integer(1)),
    "intrada.aux_classifier": BOOLEAN,
    "intrada.seg_aux": number(0),
    "intrada.adv_main": number(0),
    "intrada.adv_aux": number(0),
    "intrada.discriminator_lr": positive(),
    "intrada.discriminator_betas": Rule("a list [beta1, beta2] of two numbers in [0, 1)", lambda v: isinstance(
        v, list) and len(v) == 2 and all(is_number(x) and 0 <= x < 1 for x in v)),
    "intrada.discriminator_width": positive(),
    "intrada.lambda": probability(),
    "intrada.normalize": BOOLEAN,
    "intrada.intra_start": choice("inter", "init"),
    "intrada.select_snapshot": choice("last", "best_on_val", "best_on_train"),
    "intrada.snapshot_every": integer(1),
}


def nullable_section(key: str) -> bool:
    """Whether the section ``key`` may be switched off by setting it to null."""
    rule = SCHEMA.get(key)
    return rule is not None and rule.accepts(None)


def keys_under(prefix: str) -> List[str]:
    """The keys of the section ``prefix`` (``'data.'``; ``''`` for the top level)."""
    return sorted(k[len(prefix):] for k in SCHEMA if k.startswith(prefix) and "." not in k[len(prefix):])


def check_keys(section: Dict[str, Any], prefix: str = "") -> None:
    """Every key of ``section`` against its rule; sections recursively."""
    for key, value in section.items():
        dotted = prefix + str(key)
        rule = SCHEMA.get(dotted)
        if rule is None:
            raise ConfigError(f"unknown key {dotted!r}; known here: {', '.join(keys_under(prefix))}")
        if not rule.accepts(value):
            raise mismatch(dotted, rule.what, value)
        if isinstance(value, dict) and keys_under(dotted + "."):
            check_keys(value, dotted + ".")


def check_together(config: Dict[str, Any]) -> None:
    """Settings that must agree with each other."""
    data = config["data"]
    classes = {"gta5": 19, "synthia": 16}[data["source"]["kind"]]
    if data["num_classes"] != classes:
        raise mismatch("data.num_classes", f"{classes} for data.source.kind {data['source']['kind']}",
                       data["num_classes"])
    protocols = ("19",) if data["num_classes"] == 19 else ("16", "13")
    if config["evaluation"]["protocol"] not in protocols:
        raise mismatch("evaluation.protocol", f"one of {', '.join(map(shown, protocols))} for data.num_classes "
                       f"{data['num_classes']}", config["evaluation"]["protocol"])
    low, high = data["scale_range"]
    if low > high:
        raise mismatch("data.scale_range", "[low, high] with low <= high", data["scale_range"])
    labels = config["pseudo_labels"]
    if labels["portion_start"] > labels["portion_max"]:
        raise mismatch("pseudo_labels.portion_start", f"at most pseudo_labels.portion_max ({labels['portion_max']})",
                       labels["portion_start"])
    if data["synthetic"] and not data["synthetic_root"]:
        raise mismatch("data.synthetic_root", "a path when data.synthetic is set", data["synthetic_root"])
    if ("source_isa" in config["adaptation"]["methods"] and config["isa"]["probability"] == 0
            and data["source"]["translated_root"] is None):
        raise mismatch("adaptation.methods", "no source_isa without ISA (isa.probability > 0 or "
                       "data.source.translated_root)", config["adaptation"]["methods"])


def validate(config: Dict[str, Any]) -> None:
    """Types, ranges and agreement of a resolved config; raises ConfigError."""
    check_keys(config)
    check_together(config)


def written_by_run(config: Dict[str, Any], root: str) -> bool:
    """A dataset root the run itself writes: the synthetic pair under data.synthetic_root."""
    data = config["data"]
    if not data["synthetic"]:
        return False
    written = (os.path.join(data["synthetic_root"], "source"), os.path.join(data["synthetic_root"], "target"))
    return os.path.abspath(root) in {os.path.abspath(p) for p in written}


def target_paths(config: Dict[str, Any], training: bool) -> Iterator[Tuple[str, str]]:
    """(key, directory) of the target images and labels a run reads
    (Cityscapes layout); without ``training`` only the val split."""
    target = config["data"]["target"]
    root, train, val = target["root"], target["train_split"], target["val_split"]
    yield "data.target.root", root
    if training:
        yield "data.target.train_split", os.path.join(root, "leftImg8bit", train)
    yield "data.target.val_split", os.path.join(root, "leftImg8bit", val)
    yield "data.target.val_split", os.path.join(root, "gtFine", val)
    selects_on_train = config["intrada"]["select_snapshot"] == "best_on_train"
    if training and selects_on_train and INTRADA in config["adaptation"]["methods"]:
        yield "intrada.select_snapshot", os.path.join(root, "gtFine", train)


def required_paths(config: Dict[str, Any], training: bool) -> Iterator[Tuple[str, Optional[str], str]]:
    """(key, path, 'file' or 'dir') of what a run reads (without ``training``:
    what evaluating model files reads); the synthetic pair is left out when
    the run writes it first."""
    source = config["data"]["source"]
    if training and not written_by_run(config, source["root"]):
        yield "data.source.root", source["root"], "dir"
    if training:
        yield "data.source.list_file", source["list_file"], "file"
        yield "data.source.translated_root", source["translated_root"], "dir"
    if not written_by_run(config, config["data"]["target"]["root"]):
        yield from ((key, path, "dir") for key, path in target_paths(config, training))
    yield "model.init_weights", config["model"]["init_weights"], "file"


def check_paths(config: Dict[str, Any], training: bool = True) -> None:
    """The files and directories a run reads exist, and output_dir is not a file."""
    for key, path, kind in required_paths(config, training):
        if path is None:
            continue
        if not (os.path.isdir(path) if kind == "dir" else os.path.isfile(path)):
            raise mismatch(key, f"an existing {'directory' if kind == 'dir' else 'file'}", path)
    if os.path.exists(config["output_dir"]) and not os.path.isdir(config["output_dir"]):
        raise mismatch("output_dir", "a directory, not a file", config["output_dir"])
