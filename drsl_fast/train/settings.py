"""Typed, read-only views of a run's config sections.

:func:`~drsl_fast.train.config.load_config` resolves the config as a nested
dict and :mod:`~drsl_fast.train.schema` checks it; :meth:`Settings.of` then
gives each section of ``defaults.yaml`` as a frozen dataclass, so functions
take the section they read (``Loss``, ``PseudoLabels``, ``IntraDA``, ...)
instead of the whole dict. Nothing is checked here: the dict must be a
validated config. Lists become tuples. The dict stays the source of truth
for what a run writes (``config.yaml``) and for its digest
(:attr:`Settings.config`, :attr:`Settings.digest`).
"""
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Tuple

from .checkpoint import config_digest

# config keys that are not Python names: key -> field
FIELD_NAMES = {"lambda": "lambda_"}

Pair = Tuple[int, int]


def field_name(key: str) -> str:
    return FIELD_NAMES.get(key, key)


def frozen(value: Any) -> Any:
    """Lists as tuples (recursively); other values as they are."""
    return tuple(frozen(v) for v in value) if isinstance(value, list) else value


def section(cls, values: Mapping[str, Any]):
    """``cls`` (a dataclass of this module) from the keys of a config section;
    a field whose type is such a dataclass is built from its subsection."""
    by_field = {field_name(key): value for key, value in values.items()}
    built = {}
    for f in fields(cls):
        if not f.init:
            continue
        value = by_field[f.name]
        built[f.name] = section(f.type, value) if f.type in SUBSECTIONS else frozen(value)
    return cls(**built)


@dataclass(frozen=True)
class SourceData:
    kind: str                        # gta5 | synthia
    root: str
    list_file: Optional[str]
    translated_root: Optional[str]   # ISA: translated source images (docs/method.md §6)


@dataclass(frozen=True)
class TargetData:
    root: str
    train_split: str
    val_split: str

    def split(self, name: str) -> str:
        """The directory name of split ``name`` ('train' or 'val')."""
        return {"train": self.train_split, "val": self.val_split}[name]


@dataclass(frozen=True)
class Data:
    num_classes: int
    source: SourceData
    target: TargetData
    synthetic: Optional[Dict[str, Any]]   # SyntheticPairConfig fields, as in the config
    synthetic_root: Optional[str]
    source_size: Pair
    target_size: Pair
    crop: Pair
    normalization: str
    scale_range: Tuple[float, float]
    flip: bool
    colour_jitter: float
    workers: int
    eval_batch_size: int

    def size(self, domain: str) -> Pair:
        """data.source_size or data.target_size (``domain``: 'source' or 'target')."""
        return {"source": self.source_size, "target": self.target_size}[domain]


@dataclass(frozen=True)
class ISA:
    """Input-space adaptation, docs/method.md §6."""

    probability: float
    fda_beta: float
    stages: str                      # source | adaptation | both


@dataclass(frozen=True)
class Model:
    depth: int
    width: float
    init_weights: Optional[str]
    checkpointing: bool
    head_as_gemm: bool
    mmdl: bool
    num_modes: int
    embedding_dim: int
    sigma: float


@dataclass(frozen=True)
class Loss:
    """The weights of the DRSL loss, docs/method.md §3-§4."""

    samples_per_class: int
    alpha: float
    scale: float
    beta: float
    lambda1: float
    lambda2: float
    lambda3: float


@dataclass(frozen=True)
class Optim:
    momentum: float
    weight_decay: float
    poly_power: float


@dataclass(frozen=True)
class Source:
    iterations: int
    batch_size: int
    lr: float


@dataclass(frozen=True)
class PseudoLabels:
    """Class-balanced pseudo-labels, docs/method.md §5."""

    portion_start: float
    portion_step: float
    portion_max: float
    mantissa_bits: int
    isa: bool
    batch_size: int
    tta: bool


@dataclass(frozen=True)
class Adaptation:
    methods: Tuple[str, ...]
    rounds: int
    epochs_per_round: float
    batch_size: int
    lr: float
    poly: bool


@dataclass(frozen=True)
class Evaluation:
    protocol: str
    panels: int
    max_images: Optional[int]
    tta: bool


@dataclass(frozen=True)
class Inference:
    """How a model predicts an image, docs/method.md §9."""

    scales: Tuple[float, ...]
    flip: bool
    window: Optional[Pair]
    overlap: float


@dataclass(frozen=True)
class Predict:
    tta: bool
    resize: bool
    map: str
    overlay_alpha: float


@dataclass(frozen=True)
class Train:
    amp: str
    checkpoint_every: int
    log_every: int
    tensorboard: bool
    progress: bool
    threads: Optional[int]


@dataclass(frozen=True)
class IntraDA:
    """IntraDA, docs/method.md §7."""

    inter_iterations: int
    intra_iterations: int
    batch_size: int
    lr: float
    poly: bool
    poly_iterations: Optional[int]
    aux_classifier: bool
    seg_aux: float
    adv_main: float
    adv_aux: float
    discriminator_lr: float
    discriminator_betas: Tuple[float, float]
    discriminator_width: float
    lambda_: float                   # config key 'lambda'
    normalize: bool
    intra_start: str
    select_snapshot: str
    snapshot_every: int


SUBSECTIONS = (SourceData, TargetData)


@dataclass(frozen=True)
class Settings:
    """Every section of a validated config, typed; ``config`` is the dict itself."""

    config_name: Optional[str]
    seed: int
    device: str
    output_dir: str
    dry_run: bool
    data: Data
    isa: ISA
    model: Model
    loss: Loss
    optim: Optim
    source: Source
    pseudo_labels: PseudoLabels
    adaptation: Adaptation
    evaluation: Evaluation
    inference: Inference
    predict: Predict
    train: Train
    intrada: IntraDA
    config: Dict[str, Any] = field(compare=False, repr=False)

    @staticmethod
    def of(config: Dict[str, Any]) -> "Settings":
        """The settings of a config that :func:`~drsl_fast.train.schema.validate` accepted."""
        values = {}
        for f in fields(Settings):
            if f.name == "config":
                continue
            values[f.name] = section(f.type, config[f.name]) if f.type in SECTIONS else frozen(config[f.name])
        return Settings(**values, config=config)

    @property
    def digest(self) -> str:
        """:func:`~drsl_fast.train.checkpoint.config_digest` of the config."""
        return config_digest(self.config)


SECTIONS = (Data, ISA, Model, Loss, Optim, Source, PseudoLabels, Adaptation, Evaluation, Inference, Predict, Train,
            IntraDA)
