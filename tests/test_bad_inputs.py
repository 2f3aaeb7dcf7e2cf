"""Audit of bad inputs (issue 14): a table of bad inputs per op, run on every
backend present (reference, cpu, cuda, triton).

Each case either expects a clear error on every backend (TypeError or
ValueError whose message starts with the op's name and names the argument) or
an answer, which must equal the reference's on every backend (NaN where the
reference is NaN, the same ints bit for bit) and, where a ``check`` is given,
the answer decided in the op's docstring. Ops without backends (evaluation,
ranking, schedule) run once, under the name "torch", against their checks.
"""
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import numpy as np
import pytest
import torch

from conftest import EMULATED, device_for, emulating
from drsl_fast import ops
from drsl_fast.backends import why_unavailable
from drsl_fast.evaluation import ConfusionMatrix, per_class_iou, report
from drsl_fast.losses import DRSLLoss, segmentation_loss
from drsl_fast.pseudo_labels import ClassBalancedThresholds, portion_for_round
from drsl_fast.ranking import rank_easy_hard, rare_classes_present

# NaN inputs make the Triton interpreter's numpy warn; they are the point here.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

NAN, INF = math.nan, math.inf
BACKENDS = ("reference", "cpu", "cuda", "triton")
TORCH_ONLY = ("torch",)
ERRORS = (TypeError, ValueError)


@dataclass(frozen=True)
class Case:
    """One bad input of one op. ``kwargs`` builds the op's arguments on the
    CPU (tensors move to the backend's device, meta tensors stay); ``error``
    is (exception type, argument named in the message) when every backend
    must refuse; ``refused_by`` lists backends that refuse an otherwise
    answered input (triton: float64); ``check`` asserts the decided answer."""

    op: str
    name: str
    kwargs: Callable[[], Dict[str, Any]]
    error: Optional[Tuple[Type[Exception], str]] = None
    refused_by: Tuple[str, ...] = ()
    check: Optional[Callable[[Any], None]] = None


def tensor(*shape, seed=0, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def put(t: torch.Tensor, index, value) -> torch.Tensor:
    """A copy of ``t`` with ``t[index] = value``."""
    t = t.clone()
    t[index] = value
    return t


def to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor) and value.device.type != "meta":
        return value.to(device)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return type(value)(to_device(v, device) for v in value)
    return value


# ---------------------------------------------------------------- op runners


def run_thresholds(backend, device, num_classes=3, mantissa_bits=8, updates=(), from_logits=False, portion=0.5,
                   other=None, state=None):
    thresholds = ClassBalancedThresholds(num_classes, device=device, mantissa_bits=mantissa_bits, backend=backend)
    if state is not None:
        thresholds.load_state_dict(state)
    for scores in updates:
        thresholds.update(scores, from_logits)
    if other is not None:
        thresholds.merge(other)
    return thresholds.counts, thresholds.thresholds(portion)


def run_confusion(backend, device, num_classes=3, align_corners=True, batches=(), other=None):
    confusion = ConfusionMatrix(num_classes, device=device, align_corners=align_corners)
    for prediction, label in batches:
        confusion.update(prediction, label)
    if other is not None:
        confusion.merge(other)
    return confusion.matrix


def run_drsl_loss(backend, device, **kwargs):
    return DRSLLoss(backend=backend, **kwargs)


RUNNERS: Dict[str, Callable] = {
    "mode_distance": lambda backend, device, **kw: ops.mode_distance(**kw, backend=backend),
    "mode_posterior": lambda backend, device, **kw: ops.mode_posterior(**kw, backend=backend),
    "mmdl_losses": lambda backend, device, **kw: ops.mmdl_losses(**kw, backend=backend),
    "label_mode": lambda backend, device, **kw: ops.label_mode(**kw, backend=backend),
    "sample_per_class": lambda backend, device, **kw: ops.sample_per_class(**kw, backend=backend),
    "entropy_map": lambda backend, device, **kw: ops.entropy_map(**kw, backend=backend),
    "confidence_histogram": lambda backend, device, **kw: ops.confidence_histogram(**kw, backend=backend),
    "select_labels": lambda backend, device, **kw: ops.select_labels(**kw, backend=backend),
    "ClassBalancedThresholds": run_thresholds,
    "DRSLLoss": run_drsl_loss,
    "ConfusionMatrix": run_confusion,
    "rank_easy_hard": lambda backend, device, **kw: rank_easy_hard(**kw),
    "rare_classes_present": lambda backend, device, **kw: rare_classes_present(**kw),
    "portion_for_round": lambda backend, device, **kw: portion_for_round(**kw),
    "segmentation_loss": lambda backend, device, **kw: segmentation_loss(**kw),
    "report": lambda backend, device, **kw: report(**kw),
    "per_class_iou": lambda backend, device, **kw: per_class_iou(**kw),
}
BACKENDS_OF = {op: (TORCH_ONLY if op in ("ConfusionMatrix", "rank_easy_hard", "rare_classes_present",
                                          "portion_for_round", "segmentation_loss", "report", "per_class_iou")
                    else BACKENDS)
               for op in RUNNERS}
# The CUDA kernels (tensor-core and fp32) also run emulated on the CPU (tests/cuda_on_cpu).
for op in ("mode_distance", "mode_posterior", "mmdl_losses", "label_mode"):
    BACKENDS_OF[op] += EMULATED
# the name an error message starts with, when it is not the op's
MESSAGE_PREFIX = {"ClassBalancedThresholds": "ClassBalancedThresholds", "ConfusionMatrix": "ConfusionMatrix"}


# ---------------------------------------------------------------- mode_distance

EMB = (1, 4, 2, 3)
MODES = (3, 2, 4)


def md(name, emb=lambda: tensor(*EMB), modes=lambda: tensor(*MODES, seed=1), sigma=0.5, op="mode_distance",
       **expect) -> Case:
    return Case(op, name, lambda: dict(emb=emb(), modes=modes(), sigma=sigma), **expect)


def posterior_is(index, value):
    def check(out):
        assert out.posterior[index].item() == value
    return check


def dmin_nan_with_mode(index, mode):
    def check(out):
        assert math.isnan(out.dmin[index].item()) and out.mstar[index].item() == mode
    return check


MODE_DISTANCE_CASES = [
    md("emb list", emb=lambda: [[0.0] * 4], error=(TypeError, "emb")),
    md("emb numpy", emb=lambda: np.zeros((2, 4), np.float32), error=(TypeError, "emb")),
    md("emb None", emb=lambda: None, error=(TypeError, "emb")),
    md("modes list", modes=lambda: [[[0.0] * 4]], error=(TypeError, "modes")),
    md("emb int64", emb=lambda: torch.ones(EMB, dtype=torch.int64), error=(TypeError, "emb")),
    md("emb bool", emb=lambda: torch.ones(EMB, dtype=torch.bool), error=(TypeError, "emb")),
    md("emb complex", emb=lambda: torch.ones(EMB, dtype=torch.complex64), error=(TypeError, "emb")),
    md("modes int32", modes=lambda: torch.ones(MODES, dtype=torch.int32), error=(TypeError, "modes")),
    md("emb 3-d", emb=lambda: tensor(1, 4, 6), error=(ValueError, "emb")),
    md("emb 1-d", emb=lambda: tensor(4), error=(ValueError, "emb")),
    md("emb 5-d", emb=lambda: tensor(1, 4, 2, 3, 1), error=(ValueError, "emb")),
    md("modes 2-d", modes=lambda: tensor(6, 4), error=(ValueError, "modes")),
    md("D mismatch", modes=lambda: tensor(3, 2, 5), error=(ValueError, "modes")),
    md("17 modes", modes=lambda: tensor(3, 17, 4), error=(ValueError, "modes")),
    md("no modes", modes=lambda: tensor(3, 0, 4), error=(ValueError, "modes")),
    md("no classes", modes=lambda: tensor(0, 2, 4), error=(ValueError, "modes")),
    md("modes on meta", modes=lambda: torch.ones(MODES, device="meta"), error=(ValueError, "modes")),
    md("sigma nan", sigma=NAN, error=(ValueError, "sigma")),
    md("sigma inf", sigma=INF, error=(ValueError, "sigma")),
    md("sigma -inf", sigma=-INF, error=(ValueError, "sigma")),
    md("sigma 0", sigma=0.0, error=(ValueError, "sigma")),
    md("sigma -0.0", sigma=-0.0, error=(ValueError, "sigma")),
    md("sigma negative", sigma=-0.5, error=(ValueError, "sigma")),
    md("sigma str", sigma="0.5", error=(TypeError, "sigma")),
    md("sigma bool", sigma=True, error=(TypeError, "sigma")),
    md("sigma tensor", sigma=torch.tensor(0.5), error=(TypeError, "sigma")),
    md("sigma list", sigma=[0.5], error=(TypeError, "sigma")),
    md("sigma complex", sigma=0.5j, error=(TypeError, "sigma")),
    md("sigma numpy nan", sigma=np.float32("nan"), error=(ValueError, "sigma")),
    md("posterior sigma nan", op="mode_posterior", sigma=NAN, error=(ValueError, "sigma")),
    md("posterior emb int", op="mode_posterior", emb=lambda: torch.ones(EMB, dtype=torch.int32),
       error=(TypeError, "emb")),
    # answered, the same on every backend
    md("nan embedding", emb=lambda: put(tensor(*EMB), (0, 2, 1, 1), NAN), check=dmin_nan_with_mode((0, 1, 1, 1), 0)),
    md("nan in one mode", modes=lambda: put(tensor(*MODES, seed=1), (1, 1, 3), NAN),
       check=dmin_nan_with_mode((0, 1, 0, 2), 1)),
    md("nan in first mode", modes=lambda: put(tensor(*MODES, seed=1), (2, 0, 0), NAN),
       check=dmin_nan_with_mode((0, 2, 1, 0), 0)),
    md("inf embedding", emb=lambda: put(tensor(*EMB), (0, 0, 0, 0), INF), check=posterior_is((0, 0, 0, 0), 0.0)),
    md("-inf embedding", emb=lambda: put(tensor(*EMB), (0, 3, 1, 2), -INF)),
    md("inf mode", modes=lambda: put(tensor(*MODES, seed=1), (0, 0, 0), INF)),
    md("inf embedding and mode", emb=lambda: put(tensor(*EMB), (0, 0, 0, 0), INF),
       modes=lambda: put(tensor(*MODES, seed=1), (0, 0, 0), INF)),
    md("huge embedding", emb=lambda: tensor(*EMB, scale=1e30)),
    md("large embedding", emb=lambda: tensor(*EMB, scale=1e18)),
    md("fp16 at its limit", emb=lambda: torch.full(EMB, 65504.0, dtype=torch.float16)),
    md("bf16 huge", emb=lambda: tensor(*EMB, scale=1e35, dtype=torch.bfloat16)),
    md("tiny sigma at a mode", emb=lambda: torch.zeros(1, 4, 1, 2), modes=lambda: torch.zeros(2, 2, 4),
       sigma=1e-25, check=posterior_is((0, 1, 0, 1), 1.0)),
    md("tiny sigma off the modes", sigma=1e-25, check=posterior_is((0, 0, 0, 0), 0.0)),
    md("sigma 4e-20", emb=lambda: put(torch.zeros(1, 4, 1, 2), (0, 0, 0, 1), 1e-3), modes=lambda: torch.zeros(2, 1, 4),
       sigma=4e-20, check=posterior_is((0, 0, 0, 0), 1.0)),
    md("sigma 1e-200", emb=lambda: torch.zeros(1, 4, 1, 1), modes=lambda: torch.zeros(1, 1, 4), sigma=1e-200,
       check=posterior_is((0, 0, 0, 0), 1.0)),
    md("smallest sigma", sigma=5e-324, check=posterior_is((0, 0, 0, 0), 0.0)),
    md("huge sigma", sigma=1e30, check=posterior_is((0, 0, 0, 0), 1.0)),
    md("largest sigma", sigma=1.7e308, check=posterior_is((0, 0, 0, 0), 1.0)),
    md("huge sigma, inf embedding", sigma=1e200, emb=lambda: put(tensor(*EMB), (0, 1, 0, 0), INF)),
    md("sigma int", sigma=1),
    md("sigma numpy float32", sigma=np.float32(0.5)),
    md("no sigma", sigma=None),
    md("B = 0", emb=lambda: tensor(0, 4, 2, 3)),
    md("H = 0", emb=lambda: tensor(2, 4, 0, 3)),
    md("W = 0", emb=lambda: tensor(1, 4, 3, 0)),
    md("N = 0", emb=lambda: tensor(0, 4)),
    md("D = 0", emb=lambda: tensor(1, 0, 2, 3), modes=lambda: tensor(3, 2, 0),
       check=lambda out: (out.dmin == 0).all() and (out.posterior == 1).all()),
    md("(N, D) embeddings", emb=lambda: tensor(5, 4)),
    md("one class, sixteen modes", modes=lambda: tensor(1, 16, 4)),
    md("tied modes", modes=lambda: tensor(3, 1, 4).expand(3, 2, 4).contiguous(),
       check=lambda out: (out.mstar == 0).all()),
    md("channels-last", emb=lambda: tensor(2, 4, 2, 3).contiguous(memory_format=torch.channels_last)),
    md("strided view", emb=lambda: tensor(1, 8, 4, 6)[:, ::2, ::2, ::2]),
    md("expanded embedding", emb=lambda: tensor(1, 4, 1, 1).expand(EMB)),
    md("transposed (N, D)", emb=lambda: tensor(4, 5).t()),
    md("float64", emb=lambda: tensor(*EMB, dtype=torch.float64), refused_by=("triton",)),
    md("posterior nan embedding", op="mode_posterior", emb=lambda: put(tensor(*EMB), (0, 0, 1, 2), NAN)),
]


# ---------------------------------------------------------------- mmdl_losses, label_mode

SAMPLE_EMB = (2, 4, 2, 3)
SAMPLE_INDEX = [[0, 1, 5, 2], [3, 4, 0, 5]]
SAMPLE_LABEL = [[0, 1, 2, 1], [2, 0, 1, 0]]


def ml(name, op="mmdl_losses", emb=lambda: tensor(*SAMPLE_EMB), index=lambda: torch.tensor(SAMPLE_INDEX),
       label=lambda: torch.tensor(SAMPLE_LABEL), modes=lambda: tensor(*MODES, seed=1), **params) -> Case:
    """An mmdl_losses (reduction 'none' unless given) or label_mode case."""
    expect = {key: params.pop(key) for key in ("error", "refused_by", "check") if key in params}
    if op == "mmdl_losses":
        params.setdefault("reduction", "none")
    return Case(op, name, lambda: dict(emb=emb(), index=index(), label=label(), modes=modes(), **params), **expect)


def losses_nan_at(*samples):
    def check(out):
        for sample in samples:
            assert math.isnan(out.triplet[sample].item()) and math.isnan(out.ce[sample].item())
        assert int(torch.isnan(out.triplet).sum()) == len(samples)
    return check


def losses_zero_at(*samples):
    def check(out):
        for sample in samples:
            assert out.triplet[sample].item() == 0 and out.ce[sample].item() == 0
    return check


MMDL_CASES = [
    ml("emb list", emb=lambda: [[0.0]], error=(TypeError, "emb")),
    ml("emb int", emb=lambda: torch.ones(SAMPLE_EMB, dtype=torch.int64), error=(TypeError, "emb")),
    ml("modes D mismatch", modes=lambda: tensor(3, 2, 5), error=(ValueError, "modes")),
    ml("index float", index=lambda: torch.tensor(SAMPLE_INDEX).float(), error=(TypeError, "index")),
    ml("index bool", index=lambda: torch.tensor(SAMPLE_INDEX) > 0, error=(TypeError, "index")),
    ml("index uint32", index=lambda: torch.tensor(SAMPLE_INDEX).to(torch.uint32), error=(TypeError, "index")),
    ml("index list", index=lambda: SAMPLE_INDEX, error=(TypeError, "index")),
    ml("label float", label=lambda: torch.tensor(SAMPLE_LABEL).double(), error=(TypeError, "label")),
    ml("label numpy", label=lambda: np.array(SAMPLE_LABEL), error=(TypeError, "label")),
    ml("index 1-d", index=lambda: torch.tensor(SAMPLE_INDEX).flatten(), error=(ValueError, "index")),
    ml("index B mismatch", index=lambda: torch.tensor(SAMPLE_INDEX)[:1], error=(ValueError, "index")),
    ml("label shape", label=lambda: torch.tensor(SAMPLE_LABEL)[:, :3], error=(ValueError, "label")),
    ml("index on meta", index=lambda: torch.zeros(2, 4, dtype=torch.long, device="meta"), error=(ValueError, "index")),
    ml("sigma nan", sigma=NAN, error=(ValueError, "sigma")),
    ml("sigma 0", sigma=0.0, error=(ValueError, "sigma")),
    ml("sigma -inf", sigma=-INF, error=(ValueError, "sigma")),
    ml("sigma str", sigma="0.5", error=(TypeError, "sigma")),
    ml("sigma None", sigma=None, error=(TypeError, "sigma")),
    ml("alpha nan", alpha=NAN, error=(ValueError, "alpha")),
    ml("alpha inf", alpha=INF, error=(ValueError, "alpha")),
    ml("alpha str", alpha="1", error=(TypeError, "alpha")),
    ml("alpha bool", alpha=False, error=(TypeError, "alpha")),
    ml("scale nan", scale=NAN, error=(ValueError, "scale")),
    ml("scale -inf", scale=-INF, error=(ValueError, "scale")),
    ml("scale None", scale=None, error=(TypeError, "scale")),
    ml("reduction sum", reduction="sum", error=(ValueError, "reduction")),
    ml("reduction None", reduction=None, error=(ValueError, "reduction")),
    ml("label_mode index float", op="label_mode", index=lambda: torch.tensor(SAMPLE_INDEX).float(),
       error=(TypeError, "index")),
    ml("label_mode label list", op="label_mode", label=lambda: SAMPLE_LABEL, error=(TypeError, "label")),
    ml("label_mode modes 2-d", op="label_mode", modes=lambda: tensor(6, 4), error=(ValueError, "modes")),
    # answered, the same on every backend
    ml("nan at a sampled pixel", emb=lambda: put(tensor(*SAMPLE_EMB), (0, 1, 0, 1), NAN),
       check=losses_nan_at((0, 1))),
    ml("nan at another pixel", emb=lambda: put(tensor(*SAMPLE_EMB), (1, 1, 0, 1), NAN), check=losses_nan_at()),
    ml("nan in a mode", modes=lambda: put(tensor(*MODES, seed=1), (2, 1, 0), NAN)),
    ml("inf at a sampled pixel", emb=lambda: put(tensor(*SAMPLE_EMB), (1, 0, 0, 0), INF)),
    ml("-inf in a mode", modes=lambda: put(tensor(*MODES, seed=1), (0, 0, 3), -INF)),
    ml("one class with nan", modes=lambda: tensor(1, 2, 4, seed=1), label=lambda: torch.zeros(2, 4, dtype=torch.long),
       emb=lambda: put(tensor(*SAMPLE_EMB), (0, 0, 0, 0), NAN), check=losses_nan_at((0, 0))),
    ml("one class", modes=lambda: tensor(1, 2, 4, seed=1), label=lambda: torch.zeros(2, 4, dtype=torch.long),
       check=lambda out: (out.triplet == 0).all()),
    ml("ids out of range", index=lambda: torch.tensor([[-1, 6, 1000, -1000], [0, 1, 2, 3]]),
       label=lambda: torch.tensor([[0, 0, 0, 0], [-1, 3, 255, 1 << 40]]), check=losses_zero_at((0, 0), (1, 3))),
    ml("index int32, label uint8", index=lambda: torch.tensor(SAMPLE_INDEX, dtype=torch.int32),
       label=lambda: torch.tensor([[0, 255, 2, 1], [2, 0, 255, 0]], dtype=torch.uint8)),
    ml("index int16, label int8", index=lambda: torch.tensor(SAMPLE_INDEX, dtype=torch.int16),
       label=lambda: torch.tensor([[0, -1, 2, 1], [2, 0, -128, 0]], dtype=torch.int8)),
    ml("repeated pixel", index=lambda: torch.full((2, 4), 3)),
    ml("B = 0", emb=lambda: tensor(0, 4, 2, 3), index=lambda: torch.zeros(0, 4, dtype=torch.long),
       label=lambda: torch.zeros(0, 4, dtype=torch.long)),
    ml("S = 0", index=lambda: torch.zeros(2, 0, dtype=torch.long), label=lambda: torch.zeros(2, 0, dtype=torch.long)),
    ml("H = 0", emb=lambda: tensor(2, 4, 0, 3), check=losses_zero_at((0, 0), (1, 3))),
    ml("N = 0", emb=lambda: tensor(0, 4), index=lambda: torch.zeros(1, 3, dtype=torch.long),
       label=lambda: torch.zeros(1, 3, dtype=torch.long)),
    ml("D = 0", emb=lambda: tensor(2, 0, 2, 3), modes=lambda: tensor(3, 2, 0)),
    ml("mean with nan", emb=lambda: put(tensor(*SAMPLE_EMB), (0, 1, 0, 1), NAN), reduction="mean",
       check=lambda out: math.isnan(out.triplet.item()) and math.isnan(out.ce.item())),
    ml("mean of nothing", index=lambda: torch.full((2, 4), -1), reduction="mean",
       check=lambda out: out.triplet.item() == 0 and out.ce.item() == 0 and out.count.item() == 0),
    ml("tiny sigma", sigma=1e-25),
    ml("tiny sigma at a mode", emb=lambda: torch.zeros(SAMPLE_EMB), modes=lambda: torch.zeros(3, 2, 4), sigma=1e-30,
       check=lambda out: torch.allclose(out.ce, torch.full_like(out.ce, math.log(3)))),
    ml("huge sigma", sigma=1e200),
    ml("alpha negative", alpha=-2.0),
    ml("scale 0", scale=0.0),
    ml("scale negative", scale=-15.0),
    ml("fp16", emb=lambda: tensor(*SAMPLE_EMB, dtype=torch.float16)),
    ml("float64", emb=lambda: tensor(*SAMPLE_EMB, dtype=torch.float64), refused_by=("triton",)),
    ml("label_mode nan embedding", op="label_mode", emb=lambda: put(tensor(*SAMPLE_EMB), (0, 1, 0, 1), NAN),
       check=lambda out: out[0, 1].item() == 0),
    ml("label_mode nan in a mode", op="label_mode", modes=lambda: put(tensor(*MODES, seed=1), (1, 1, 2), NAN),
       check=lambda out: out[0, 1].item() == 1 and out[0, 3].item() == 1),
    ml("label_mode ids out of range", op="label_mode", index=lambda: torch.tensor([[-1, 6, 1, 2], [0, 1, 2, 3]]),
       label=lambda: torch.tensor([[0, 0, 3, 255], [-1, 0, 1, 2]]), check=lambda out: out[0].tolist() == [255] * 4
       and out[1, 0].item() == 255 and (out[1, 1:] < 2).all()),
    ml("label_mode H = 0", op="label_mode", emb=lambda: tensor(2, 4, 0, 3),
       check=lambda out: (out == 255).all()),
    ml("label_mode B = 0", op="label_mode", emb=lambda: tensor(0, 4, 2, 3),
       index=lambda: torch.zeros(0, 4, dtype=torch.long), label=lambda: torch.zeros(0, 4, dtype=torch.long)),
    ml("label_mode N = 0", op="label_mode", emb=lambda: tensor(0, 4), index=lambda: torch.zeros(1, 3, dtype=torch.long),
       label=lambda: torch.zeros(1, 3, dtype=torch.long), check=lambda out: (out == 255).all()),
    ml("label_mode S = 0", op="label_mode", index=lambda: torch.zeros(2, 0, dtype=torch.long),
       label=lambda: torch.zeros(2, 0, dtype=torch.long)),
    ml("label_mode float64", op="label_mode", emb=lambda: tensor(*SAMPLE_EMB, dtype=torch.float64),
       refused_by=("triton",)),
]


# ---------------------------------------------------------------- sample_per_class

SAMPLE_LABELS = [[[0, 1, 2], [2, 2, 0]], [[1, 1, 0], [0, 2, 1]]]


def sp(name, labels=lambda: torch.tensor(SAMPLE_LABELS), num_classes=3, k=8, **expect) -> Case:
    """k = 8 >= H * W unless given: every pixel of a class is drawn, so every
    backend draws the same set."""
    generator = expect.pop("generator", None)
    return Case("sample_per_class", name,
                lambda: dict(labels=labels(), num_classes=num_classes, k=k, generator=generator), **expect)


def counts_are(expected):
    def check(out):
        assert out.count.tolist() == expected
    return check


SAMPLING_CASES = [
    sp("labels float", labels=lambda: torch.tensor(SAMPLE_LABELS).float(), error=(TypeError, "labels")),
    sp("labels bool", labels=lambda: torch.tensor(SAMPLE_LABELS) > 0, error=(TypeError, "labels")),
    sp("labels list", labels=lambda: SAMPLE_LABELS, error=(TypeError, "labels")),
    sp("labels 2-d", labels=lambda: torch.tensor(SAMPLE_LABELS)[0], error=(ValueError, "labels")),
    sp("labels 4-d", labels=lambda: torch.tensor(SAMPLE_LABELS)[None], error=(ValueError, "labels")),
    sp("num_classes 0", num_classes=0, error=(ValueError, "num_classes")),
    sp("num_classes -1", num_classes=-1, error=(ValueError, "num_classes")),
    sp("num_classes float", num_classes=3.0, error=(TypeError, "num_classes")),
    sp("num_classes bool", num_classes=True, error=(TypeError, "num_classes")),
    sp("num_classes str", num_classes="3", error=(TypeError, "num_classes")),
    sp("num_classes None", num_classes=None, error=(TypeError, "num_classes")),
    sp("num_classes too many", num_classes=1 << 14, error=(ValueError, "num_classes")),
    sp("k -1", k=-1, error=(ValueError, "k")),
    sp("k float", k=2.5, error=(TypeError, "k")),
    sp("k bool", k=True, error=(TypeError, "k")),
    sp("k None", k=None, error=(TypeError, "k")),
    sp("generator int", generator=5, error=(TypeError, "generator")),
    sp("labels uint16", labels=lambda: torch.tensor(SAMPLE_LABELS).to(torch.uint16), error=(TypeError, "labels")),
    sp("labels uint64", labels=lambda: torch.tensor(SAMPLE_LABELS).to(torch.uint64), error=(TypeError, "labels")),
    # answered, the same on every backend
    sp("ids out of range", labels=lambda: torch.tensor([[[0, -1, 255], [3, 1000, 1]]]), check=counts_are([[1, 1, 0]])),
    sp("int8 negative ids", labels=lambda: torch.tensor([[[0, -1, -128], [2, 1, 127]]], dtype=torch.int8),
       check=counts_are([[1, 1, 1]])),
    sp("uint8 with 255", labels=lambda: torch.tensor([[[0, 255, 255], [2, 2, 1]]], dtype=torch.uint8),
       check=counts_are([[1, 1, 2]])),
    sp("int16", labels=lambda: torch.tensor(SAMPLE_LABELS, dtype=torch.int16)),
    sp("int32", labels=lambda: torch.tensor(SAMPLE_LABELS, dtype=torch.int32)),
    sp("transposed labels", labels=lambda: torch.tensor(SAMPLE_LABELS).transpose(1, 2)),
    sp("huge ids", labels=lambda: torch.tensor([[[1 << 40, -(1 << 40), 2]]]), check=counts_are([[0, 0, 1]])),
    sp("all ignored", labels=lambda: torch.full((2, 2, 3), 255), check=counts_are([[0, 0, 0], [0, 0, 0]])),
    sp("B = 0", labels=lambda: torch.zeros(0, 2, 3, dtype=torch.long)),
    sp("H = 0", labels=lambda: torch.zeros(2, 0, 3, dtype=torch.long), check=counts_are([[0, 0, 0], [0, 0, 0]])),
    sp("W = 0", labels=lambda: torch.zeros(1, 3, 0, dtype=torch.long)),
    sp("k = 0", k=0, check=counts_are([[0, 0, 0], [0, 0, 0]])),
    sp("k = 1", k=1, check=counts_are([[1, 1, 1], [1, 1, 1]])),
    sp("one class", num_classes=1, check=counts_are([[2], [2]])),
    sp("many classes", num_classes=300),
    sp("numpy ints", num_classes=np.int64(3), k=np.int32(8)),
]


# ---------------------------------------------------------------- entropy_map

LOGITS = (2, 3, 2, 2)


def en(name, logits=lambda: tensor(*LOGITS), with_map=True, **expect) -> Case:
    return Case("entropy_map", name, lambda: dict(logits=logits(), with_map=with_map), **expect)


def entropy_nan_at(b, h, w):
    def check(out):
        assert math.isnan(out.pixel_entropy[b, h, w].item()) and math.isnan(out.image_score[b].item())
        assert int(torch.isnan(out.pixel_entropy).sum()) == 1
    return check


ENTROPY_CASES = [
    en("logits list", logits=lambda: [[0.0]], error=(TypeError, "logits")),
    en("logits int", logits=lambda: torch.ones(LOGITS, dtype=torch.int32), error=(TypeError, "logits")),
    en("logits bool", logits=lambda: torch.ones(LOGITS, dtype=torch.bool), error=(TypeError, "logits")),
    en("logits 3-d", logits=lambda: tensor(3, 2, 2), error=(ValueError, "logits")),
    en("one class", logits=lambda: tensor(2, 1, 2, 2), error=(ValueError, "logits")),
    en("with_map str", with_map="yes", error=(TypeError, "with_map")),
    en("with_map None", with_map=None, error=(TypeError, "with_map")),
    en("with_map int", with_map=1, error=(TypeError, "with_map")),
    # answered, the same on every backend
    en("nan logit", logits=lambda: put(tensor(*LOGITS), (1, 2, 0, 1), NAN), check=entropy_nan_at(1, 0, 1)),
    en("+inf logit", logits=lambda: put(tensor(*LOGITS), (0, 1, 1, 1), INF), check=entropy_nan_at(0, 1, 1)),
    en("-inf logit", logits=lambda: put(tensor(*LOGITS), (0, 0, 0, 0), -INF)),
    en("all -inf", logits=lambda: put(tensor(*LOGITS), (0, slice(None), 1, 0), -INF), check=entropy_nan_at(0, 1, 0)),
    en("huge logits", logits=lambda: tensor(*LOGITS, scale=1e30)),
    en("fp16 at its limit", logits=lambda: put(torch.zeros(LOGITS, dtype=torch.float16), (0, 0), 65504.0)),
    en("bf16", logits=lambda: tensor(*LOGITS, dtype=torch.bfloat16)),
    en("B = 0", logits=lambda: tensor(0, 3, 2, 2)),
    en("H = 0", logits=lambda: tensor(2, 3, 0, 2), check=lambda out: torch.isnan(out.image_score).all()),
    en("W = 0", logits=lambda: tensor(1, 3, 2, 0)),
    en("B = 0 without map", logits=lambda: tensor(0, 3, 2, 2), with_map=False),
    en("H = 0 without map", logits=lambda: tensor(2, 3, 0, 2), with_map=False),
    en("expanded logits", logits=lambda: tensor(1, 3, 1, 1).expand(2, 3, 2, 2)),
    en("without map, nan", with_map=False, logits=lambda: put(tensor(*LOGITS), (0, 0, 0, 0), NAN),
       check=lambda out: out.map is None),
    en("two classes", logits=lambda: tensor(1, 2, 3, 3)),
    en("numpy bool", with_map=np.bool_(False)),
    en("channels-last", logits=lambda: tensor(2, 3, 2, 2).contiguous(memory_format=torch.channels_last)),
    en("float64", logits=lambda: tensor(*LOGITS, dtype=torch.float64), refused_by=("triton",)),
]


# ---------------------------------------------------------------- confidence_histogram, select_labels

PROBS = (2, 3, 2, 2)


def probs(seed=0, shape=PROBS, dtype=torch.float32) -> torch.Tensor:
    return tensor(*shape, seed=seed).softmax(1).to(dtype)


def hi(name, scores=lambda: probs(), from_logits=False, mantissa_bits=4, **expect) -> Case:
    return Case("confidence_histogram", name,
                lambda: dict(scores=scores(), from_logits=from_logits, mantissa_bits=mantissa_bits), **expect)


def counted_in_last_bin(cls, pixels):
    def check(counts):
        assert counts[cls, -1].item() == pixels
    return check


HISTOGRAM_CASES = [
    hi("scores list", scores=lambda: [[0.5]], error=(TypeError, "scores")),
    hi("scores int", scores=lambda: torch.ones(PROBS, dtype=torch.int64), error=(TypeError, "scores")),
    hi("scores 3-d", scores=lambda: probs()[0], error=(ValueError, "scores")),
    hi("no classes", scores=lambda: torch.zeros(1, 0, 2, 2), error=(ValueError, "scores")),
    hi("256 classes", scores=lambda: torch.rand(1, 256, 1, 1), error=(ValueError, "scores")),
    hi("from_logits str", from_logits="no", error=(TypeError, "from_logits")),
    hi("from_logits None", from_logits=None, error=(TypeError, "from_logits")),
    hi("from_logits 2", from_logits=2, error=(TypeError, "from_logits")),
    hi("mantissa_bits -1", mantissa_bits=-1, error=(ValueError, "mantissa_bits")),
    hi("mantissa_bits 17", mantissa_bits=17, error=(ValueError, "mantissa_bits")),
    hi("mantissa_bits float", mantissa_bits=2.5, error=(TypeError, "mantissa_bits")),
    hi("mantissa_bits bool", mantissa_bits=True, error=(TypeError, "mantissa_bits")),
    hi("mantissa_bits str", mantissa_bits="8", error=(TypeError, "mantissa_bits")),
    # answered, the same on every backend
    hi("nan in class 0", scores=lambda: put(probs(), (0, 0, 0, 0), NAN), check=counted_in_last_bin(0, 1)),
    hi("nan in class 2", scores=lambda: put(probs(), (1, 2, 1, 0), NAN), check=counted_in_last_bin(2, 1)),
    hi("nan in two classes", scores=lambda: put(put(probs(), (0, 2, 1, 1), NAN), (0, 1, 1, 1), NAN),
       check=counted_in_last_bin(1, 1)),
    hi("all nan", scores=lambda: torch.full(PROBS, NAN), check=counted_in_last_bin(0, 8)),
    hi("+inf probability", scores=lambda: put(probs(), (0, 1, 0, 1), INF)),
    hi("-inf probability", scores=lambda: put(probs(), (0, 0, 0, 1), -INF)),
    hi("negative probabilities", scores=lambda: -probs()),
    hi("probabilities above 1", scores=lambda: probs() * 3),
    hi("logits with nan", from_logits=True, scores=lambda: put(tensor(*PROBS), (1, 1, 1, 1), NAN),
       check=counted_in_last_bin(1, 1)),
    hi("logits with +inf", from_logits=True, scores=lambda: put(tensor(*PROBS), (0, 2, 0, 0), INF),
       check=counted_in_last_bin(2, 1)),
    hi("logits with -inf", from_logits=True, scores=lambda: put(tensor(*PROBS), (0, 2, 0, 0), -INF)),
    hi("huge logits", from_logits=True, scores=lambda: tensor(*PROBS, scale=1e30)),
    hi("B = 0", scores=lambda: torch.zeros(0, 3, 2, 2), check=lambda counts: counts.sum().item() == 0),
    hi("H = 0", scores=lambda: torch.zeros(2, 3, 0, 2), check=lambda counts: counts.sum().item() == 0),
    hi("one class", scores=lambda: torch.ones(1, 1, 2, 3)),
    hi("W = 0 logits", from_logits=True, scores=lambda: torch.zeros(2, 3, 2, 0)),
    hi("transposed scores", scores=lambda: probs().transpose(2, 3)),
    hi("255 classes", scores=lambda: probs(shape=(1, 255, 1, 2))),
    hi("mantissa_bits 0", mantissa_bits=0),
    hi("mantissa_bits 16", mantissa_bits=16),
    hi("fp16", scores=lambda: probs(dtype=torch.float16)),
    hi("float64", scores=lambda: probs(dtype=torch.float64)),
    hi("channels-last", scores=lambda: probs().contiguous(memory_format=torch.channels_last)),
]


def se(name, probs_=lambda: probs(), thresholds=lambda: torch.tensor([0.4, 0.3, 0.35]), **expect) -> Case:
    return Case("select_labels", name, lambda: dict(probs=probs_(), thresholds=thresholds()), **expect)


def label_at(index, value):
    def check(labels):
        assert labels[index].item() == value
    return check


SELECT_CASES = [
    se("probs list", probs_=lambda: [[0.5]], error=(TypeError, "probs")),
    se("probs int", probs_=lambda: torch.ones(PROBS, dtype=torch.int64), error=(TypeError, "probs")),
    se("probs 3-d", probs_=lambda: probs()[0], error=(ValueError, "probs")),
    se("256 classes", probs_=lambda: torch.rand(1, 256, 1, 1), thresholds=lambda: torch.rand(256) + 0.1,
       error=(ValueError, "probs")),
    se("thresholds list", thresholds=lambda: [0.4, 0.3, 0.35], error=(TypeError, "thresholds")),
    se("thresholds int", thresholds=lambda: torch.ones(3, dtype=torch.int64), error=(TypeError, "thresholds")),
    se("thresholds too many", thresholds=lambda: torch.full((4,), 0.5), error=(ValueError, "thresholds")),
    se("thresholds 2-d", thresholds=lambda: torch.full((1, 3), 0.5), error=(ValueError, "thresholds")),
    se("thresholds 0-d", thresholds=lambda: torch.tensor(0.5), error=(ValueError, "thresholds")),
    se("threshold nan", thresholds=lambda: torch.tensor([NAN, 0.3, 0.35]), error=(ValueError, "thresholds")),
    se("threshold 0", thresholds=lambda: torch.tensor([0.4, 0.0, 0.35]), error=(ValueError, "thresholds")),
    se("threshold negative", thresholds=lambda: torch.tensor([0.4, 0.3, -0.5]), error=(ValueError, "thresholds")),
    se("threshold -inf", thresholds=lambda: torch.tensor([-INF, 0.3, 0.35]), error=(ValueError, "thresholds")),
    se("threshold 0 in float32", thresholds=lambda: torch.tensor([1e-50, 0.3, 0.35], dtype=torch.float64),
       error=(ValueError, "thresholds")),
    se("thresholds on meta", thresholds=lambda: torch.ones(3, device="meta"), error=(ValueError, "thresholds")),
    # answered, the same on every backend
    se("nan probability", probs_=lambda: put(probs(), (0, 2, 1, 1), NAN), check=label_at((0, 1, 1), 255)),
    se("nan in class 0", probs_=lambda: put(probs(), (1, 0, 0, 0), NAN), check=label_at((1, 0, 0), 255)),
    se("inf over inf", probs_=lambda: put(probs(), (0, 1, 0, 0), INF),
       thresholds=lambda: torch.tensor([0.4, INF, 0.35]), check=label_at((0, 0, 0), 255)),
    se("inf probability", probs_=lambda: put(probs(), (0, 2, 0, 1), INF), check=label_at((0, 0, 1), 2)),
    se("inf threshold", thresholds=lambda: torch.tensor([INF, 0.3, 0.35])),
    se("all inf thresholds", thresholds=lambda: torch.full((3,), INF),
       check=lambda labels: (labels == 255).all()),
    se("tiny threshold", thresholds=lambda: torch.tensor([1e-30, 0.3, 0.35]), check=label_at((0, 0, 0), 0)),
    se("ratio exactly 1", probs_=lambda: torch.full((1, 2, 1, 1), 0.5), thresholds=lambda: torch.full((2,), 0.5),
       check=label_at((0, 0, 0), 0)),
    se("negative probabilities", probs_=lambda: -probs(), check=lambda labels: (labels == 255).all()),
    se("float64 thresholds", thresholds=lambda: torch.tensor([0.4, 0.3, 0.35], dtype=torch.float64)),
    se("fp16 probs", probs_=lambda: probs(dtype=torch.float16)),
    se("B = 0", probs_=lambda: torch.zeros(0, 3, 2, 2)),
    se("H = 0", probs_=lambda: torch.zeros(2, 3, 0, 2)),
    se("W = 0", probs_=lambda: torch.zeros(1, 3, 2, 0)),
    se("strided thresholds", thresholds=lambda: torch.tensor([0.4, 9.0, 0.3, 9.0, 0.35, 9.0])[::2]),
    se("one class", probs_=lambda: torch.ones(1, 1, 2, 2), thresholds=lambda: torch.ones(1)),
    se("channels-last", probs_=lambda: probs().contiguous(memory_format=torch.channels_last)),
]


# ---------------------------------------------------------------- ClassBalancedThresholds, DRSLLoss

def th(name, **kwargs) -> Case:
    expect = {key: kwargs.pop(key) for key in ("error", "check") if key in kwargs}
    updates = kwargs.pop("updates", lambda: [probs()])
    return Case("ClassBalancedThresholds", name, lambda: dict(updates=updates(), **kwargs), **expect)


THRESHOLD_CASES = [
    th("num_classes float", num_classes=3.0, error=(TypeError, "num_classes")),
    th("num_classes 0", num_classes=0, error=(ValueError, "num_classes")),
    th("num_classes 256", num_classes=256, error=(ValueError, "num_classes")),
    th("num_classes str", num_classes="3", error=(TypeError, "num_classes")),
    th("num_classes bool", num_classes=True, error=(TypeError, "num_classes")),
    th("mantissa_bits float", mantissa_bits=8.0, error=(TypeError, "mantissa_bits")),
    th("mantissa_bits 17", mantissa_bits=17, error=(ValueError, "mantissa_bits")),
    th("scores of 4 classes", updates=lambda: [probs(shape=(1, 4, 2, 2))], error=(ValueError, "scores")),
    th("scores list", updates=lambda: [[[0.5]]], error=(TypeError, "scores")),
    th("scores int", updates=lambda: [torch.ones(PROBS, dtype=torch.int64)], error=(TypeError, "scores")),
    th("scores 3-d", updates=lambda: [probs()[0]], error=(ValueError, "scores")),
    th("scores on meta", updates=lambda: [torch.ones(PROBS, device="meta")], error=(ValueError, "scores")),
    th("from_logits str", from_logits="yes", error=(TypeError, "from_logits")),
    th("portion nan", portion=NAN, error=(ValueError, "portion")),
    th("portion above 1", portion=1.5, error=(ValueError, "portion")),
    th("portion negative", portion=-0.1, error=(ValueError, "portion")),
    th("portion str", portion="0.5", error=(TypeError, "portion")),
    th("portion None", portion=None, error=(TypeError, "portion")),
    th("merge a tensor", other=torch.zeros(3), error=(TypeError, "other")),
    th("load a list", state=[1], error=(TypeError, "state")),
    th("load float counts", state={"counts": torch.zeros(3, 385), "mantissa_bits": 4}, mantissa_bits=4,
       error=(TypeError, "state['counts']")),
    th("load another resolution", state={"counts": torch.zeros(3, 385, dtype=torch.long), "mantissa_bits": 4},
       error=(ValueError, "state['counts']")),
    # answered, the same on every backend
    th("nan probabilities", updates=lambda: [put(probs(), (0, 1, 0, 0), NAN), probs(seed=1)]),
    th("all nan", updates=lambda: [torch.full(PROBS, NAN)], portion=1.0,
       check=lambda out: out[1].tolist() == [0.0, 1.0, 1.0]),
    th("nothing seen", updates=lambda: [], check=lambda out: out[1].tolist() == [1.0, 1.0, 1.0]),
    th("empty batch", updates=lambda: [torch.zeros(0, 3, 2, 2)], check=lambda out: out[1].tolist() == [1.0] * 3),
    th("portion 0", portion=0.0),
    th("H = 0 batch", updates=lambda: [torch.zeros(2, 3, 0, 2), probs()]),
    th("portion 1", portion=1, mantissa_bits=0),
    th("logits with inf", from_logits=True, updates=lambda: [put(tensor(*PROBS), (0, 0, 1, 1), INF)]),
]


def dl(name, **kwargs) -> Case:
    error = kwargs.pop("error", None)
    return Case("DRSLLoss", name, lambda: {"num_classes": 3, **kwargs}, error=error)


DRSL_LOSS_CASES = [
    dl("num_classes float", num_classes=3.0, error=(TypeError, "num_classes")),
    dl("samples_per_class -1", samples_per_class=-1, error=(ValueError, "samples_per_class")),
    dl("sigma 0", sigma=0.0, error=(ValueError, "sigma")),
    dl("alpha nan", alpha=NAN, error=(ValueError, "alpha")),
    dl("lambda3 inf", lambda3=INF, error=(ValueError, "lambda3")),
    dl("beta str", beta="1", error=(TypeError, "beta")),
    dl("consistency str", consistency="yes", error=(TypeError, "consistency")),
]


# ---------------------------------------------------------------- evaluation, ranking, schedule (torch only)

GT = [[[0, 1, 2], [255, 2, 1]]]


def cm(name, prediction=lambda: torch.tensor([[[0, 1, 1], [2, 2, 0]]]), label=lambda: torch.tensor(GT),
       **kwargs) -> Case:
    expect = {key: kwargs.pop(key) for key in ("error", "check") if key in kwargs}
    return Case("ConfusionMatrix", name, lambda: dict(batches=[(prediction(), label())], **kwargs), **expect)


def matrix_is(expected):
    def check(matrix):
        assert matrix.tolist() == expected
    return check


def one_hot_scores(ids) -> torch.Tensor:
    """(1, 3, H, W) scores whose argmax is ``ids`` (H, W)."""
    return torch.nn.functional.one_hot(torch.tensor([ids]), 3).permute(0, 3, 1, 2).float()


CONFUSION_CASES = [
    cm("num_classes float", num_classes=3.0, error=(TypeError, "num_classes")),
    cm("num_classes 0", num_classes=0, error=(ValueError, "num_classes")),
    cm("num_classes bool", num_classes=True, error=(TypeError, "num_classes")),
    cm("align_corners str", align_corners="yes", error=(TypeError, "align_corners")),
    cm("prediction id -1", prediction=lambda: torch.tensor([[[-1, 1, 1], [2, 2, 0]]]),
       error=(ValueError, "prediction")),
    cm("prediction id 3", prediction=lambda: torch.tensor([[[0, 3, 1], [2, 2, 0]]]), error=(ValueError, "prediction")),
    cm("prediction id 300", prediction=lambda: torch.tensor([[[0, 1, 300], [2, 2, 0]]]),
       error=(ValueError, "prediction")),
    cm("prediction id 255", prediction=lambda: torch.tensor([[[0, 1, 1], [255, 2, 0]]], dtype=torch.uint8),
       error=(ValueError, "prediction")),
    cm("prediction float ids", prediction=lambda: torch.tensor([[[0.0, 1.7, 1], [2, 2, 0]]]),
       error=(TypeError, "prediction")),
    cm("label uint16", label=lambda: torch.tensor([[[0, 1, 2], [0, 2, 1]]]).to(torch.uint16),
       error=(TypeError, "label")),
    cm("prediction bool ids", prediction=lambda: torch.ones(1, 2, 3, dtype=torch.bool),
       error=(TypeError, "prediction")),
    cm("prediction list", prediction=lambda: [[[0, 1, 1]]], error=(TypeError, "prediction")),
    cm("prediction 2-d", prediction=lambda: torch.zeros(2, 3, dtype=torch.long), error=(ValueError, "prediction")),
    cm("prediction 5-d", prediction=lambda: torch.zeros(1, 3, 2, 3, 1), error=(ValueError, "prediction")),
    cm("label float", label=lambda: torch.tensor(GT).float() + 0.6, error=(TypeError, "label")),
    cm("label bool", label=lambda: torch.ones(1, 2, 3, dtype=torch.bool), error=(TypeError, "label")),
    cm("label list", label=lambda: GT, error=(TypeError, "label")),
    cm("label 2-d", label=lambda: torch.tensor(GT)[0], error=(ValueError, "label")),
    cm("scores with nan", prediction=lambda: put(one_hot_scores([[0, 1, 1], [2, 2, 0]]), (0, 1, 0, 0), NAN),
       error=(ValueError, "prediction")),
    cm("scores int", prediction=lambda: torch.ones(1, 3, 2, 3, dtype=torch.long), error=(TypeError, "prediction")),
    cm("scores of 4 classes", prediction=lambda: torch.zeros(1, 4, 2, 3), error=(ValueError, "prediction")),
    cm("scores batch mismatch", prediction=lambda: torch.zeros(2, 3, 2, 3), error=(ValueError, "prediction")),
    cm("scores without pixels", prediction=lambda: torch.zeros(1, 3, 0, 3), error=(ValueError, "prediction")),
    cm("merge a tensor", other=torch.zeros(3, 3), error=(TypeError, "other")),
    # answered
    cm("ignored labels", label=lambda: torch.tensor([[[0, -1, 3], [255, 2, 1000]]]),
       check=matrix_is([[1, 0, 0], [0, 0, 0], [0, 0, 1]])),
    cm("uint8 labels, int8 ids", prediction=lambda: torch.tensor([[[0, 1, 1], [2, 2, 0]]], dtype=torch.int8),
       label=lambda: torch.tensor(GT, dtype=torch.uint8), check=matrix_is([[1, 0, 0], [1, 1, 0], [0, 1, 1]])),
    cm("scores with inf", prediction=lambda: put(one_hot_scores([[0, 1, 1], [2, 2, 0]]), (0, 2, 0, 0), INF),
       check=matrix_is([[0, 0, 1], [1, 1, 0], [0, 1, 1]])),
    cm("B = 0", prediction=lambda: torch.zeros(0, 2, 3, dtype=torch.long),
       label=lambda: torch.zeros(0, 2, 3, dtype=torch.long), check=matrix_is([[0] * 3] * 3)),
    cm("B = 0 scores", prediction=lambda: torch.zeros(0, 3, 4, 4), label=lambda: torch.zeros(0, 2, 3, dtype=torch.long),
       check=matrix_is([[0] * 3] * 3)),
    cm("label without pixels", prediction=lambda: torch.zeros(1, 3, 4, 4),
       label=lambda: torch.zeros(1, 0, 3, dtype=torch.long), check=matrix_is([[0] * 3] * 3)),
]


def rk(name, scores=lambda: torch.tensor([0.3, 0.1, 0.2, 0.4]), **kwargs) -> Case:
    expect = {key: kwargs.pop(key) for key in ("error", "check") if key in kwargs}
    return Case("rank_easy_hard", name, lambda: dict(scores=scores(), **kwargs), **expect)


def split_is(easy, hard):
    def check(split):
        assert split.easy.tolist() == easy and split.hard.tolist() == hard
    return check


RANKING_CASES = [
    rk("nan score", scores=lambda: torch.tensor([0.3, NAN, 0.2]), error=(ValueError, "scores")),
    rk("inf score", scores=lambda: torch.tensor([0.3, INF, 0.2]), error=(ValueError, "scores")),
    rk("-inf score", scores=lambda: torch.tensor([-INF, 0.1]), error=(ValueError, "scores")),
    rk("scores list", scores=lambda: [0.3, 0.1], error=(TypeError, "scores")),
    rk("scores int", scores=lambda: torch.tensor([3, 1]), error=(TypeError, "scores")),
    rk("scores 2-d", scores=lambda: torch.rand(2, 2), error=(ValueError, "scores")),
    rk("lam nan", lam=NAN, error=(ValueError, "lam")),
    rk("lam negative", lam=-0.1, error=(ValueError, "lam")),
    rk("lam above 1", lam=1.5, error=(ValueError, "lam")),
    rk("lam str", lam="0.5", error=(TypeError, "lam")),
    rk("lam None", lam=None, error=(TypeError, "lam")),
    rk("num_rare 0", rare_counts=torch.zeros(4, dtype=torch.long), num_rare=0, error=(ValueError, "num_rare")),
    rk("num_rare float", rare_counts=torch.zeros(4, dtype=torch.long), num_rare=2.5, error=(TypeError, "num_rare")),
    rk("rare_counts float", rare_counts=torch.zeros(4), error=(TypeError, "rare_counts")),
    rk("rare_counts shape", rare_counts=torch.zeros(3, dtype=torch.long), error=(ValueError, "rare_counts")),
    rk("rare_counts negative", rare_counts=torch.tensor([0, -1, 0, 0]), error=(ValueError, "rare_counts")),
    rk("rare_counts above num_rare", rare_counts=torch.tensor([0, 12, 0, 0]), error=(ValueError, "rare_counts")),
    # answered
    rk("plain", lam=0.5, check=split_is([1, 2], [0, 3])),
    rk("num_rare unused", num_rare=0, lam=0.5, check=split_is([1, 2], [0, 3])),
    rk("no images", scores=lambda: torch.zeros(0), check=split_is([], [])),
    rk("lam 1", lam=1, check=split_is([1, 2, 0, 3], [])),
    rk("ties", scores=lambda: torch.full((3,), 0.5), check=split_is([0, 1], [2])),
    rk("float64 scores, int32 counts", scores=lambda: torch.tensor([0.3, 0.1], dtype=torch.float64),
       rare_counts=torch.tensor([0, 1], dtype=torch.int32), num_rare=1, lam=0.5, check=split_is([1], [0])),
]


def rc(name, prediction=lambda: torch.tensor([[[3, 9, 0], [255, -1, 1000]]]), **kwargs) -> Case:
    expect = {key: kwargs.pop(key) for key in ("error", "check") if key in kwargs}
    return Case("rare_classes_present", name, lambda: dict(prediction=prediction(), **kwargs), **expect)


RARE_CASES = [
    rc("float ids", prediction=lambda: torch.tensor([[[3.0, 9.5]]]), error=(TypeError, "prediction")),
    rc("nan scores", prediction=lambda: put(torch.rand(1, 19, 2, 2), (0, 3, 0, 0), NAN),
       error=(ValueError, "prediction")),
    rc("int scores", prediction=lambda: torch.ones(1, 19, 2, 2, dtype=torch.long), error=(TypeError, "prediction")),
    rc("prediction list", prediction=lambda: [[[3]]], error=(TypeError, "prediction")),
    rc("prediction 2-d", prediction=lambda: torch.zeros(2, 2, dtype=torch.long), error=(ValueError, "prediction")),
    rc("no rare classes", rare_classes=(), error=(TypeError, "rare_classes")),
    rc("negative rare class", rare_classes=(3, -1), error=(ValueError, "rare_classes")),
    rc("repeated rare class", rare_classes=(3, 3), error=(ValueError, "rare_classes")),
    rc("rare classes str", rare_classes="39", error=(TypeError, "rare_classes")),
    rc("rare class float", rare_classes=(3.0,), error=(TypeError, "rare_classes")),
    # answered
    rc("ids out of range count nothing", check=lambda counts: counts.tolist() == [2]),
    rc("-1 with rare class 0", rare_classes=(0,), prediction=lambda: torch.tensor([[[-1, 5]]]),
       check=lambda counts: counts.tolist() == [0]),
    rc("no images", prediction=lambda: torch.zeros(0, 2, 2, dtype=torch.long), check=lambda c: c.tolist() == []),
    rc("no pixels", prediction=lambda: torch.zeros(2, 0, 2, dtype=torch.long), check=lambda c: c.tolist() == [0, 0]),
]


def pr(name, round_index=1, **kwargs) -> Case:
    expect = {key: kwargs.pop(key) for key in ("error", "check") if key in kwargs}
    return Case("portion_for_round", name, lambda: dict(round_index=round_index, **kwargs), **expect)


def sl(name, logits=lambda: tensor(1, 3, 2, 2), labels=lambda: torch.tensor([[[0, 1], [2, 255]]]), **kwargs) -> Case:
    expect = {key: kwargs.pop(key) for key in ("error", "check") if key in kwargs}
    return Case("segmentation_loss", name, lambda: dict(logits=logits(), labels=labels(), **kwargs), **expect)


MISC_CASES = [
    Case("report", "confusion list", lambda: dict(confusion=[[1]]), error=(TypeError, "confusion")),
    Case("report", "protocol int", lambda: dict(confusion=torch.eye(19), protocol=19), error=(ValueError, "protocol")),
    Case("report", "three classes", lambda: dict(confusion=torch.eye(3)), error=(ValueError, "confusion")),
    Case("report", "not square", lambda: dict(confusion=torch.ones(19, 3)), error=(ValueError, "confusion")),
    Case("report", "16 classes, 19 protocol", lambda: dict(confusion=torch.eye(16)), error=(ValueError, "19")),
    Case("per_class_iou", "3-d matrix", lambda: dict(matrix=torch.ones(3, 3, 3)), error=(ValueError, "matrix")),
    Case("per_class_iou", "matrix list", lambda: dict(matrix=[[1]]), error=(TypeError, "matrix")),
    Case("per_class_iou", "empty rows and columns", lambda: dict(matrix=torch.tensor([[2, 0], [0, 0]])),
         check=lambda iou: iou[0].item() == 1 and math.isnan(iou[1].item())),
    pr("round -1", round_index=-1, error=(ValueError, "round_index")),
    pr("round str", round_index="1", error=(TypeError, "round_index")),
    pr("round float", round_index=1.0, error=(TypeError, "round_index")),
    pr("start nan", start=NAN, error=(ValueError, "start")),
    pr("cap above 1", cap=2.0, error=(ValueError, "cap")),
    pr("numpy round", round_index=np.int64(2), check=lambda portion: portion == 0.3),
    sl("labels float", labels=lambda: torch.tensor([[[0.0, 1.5], [2, 255]]]), error=(TypeError, "labels")),
    sl("logits int", logits=lambda: torch.ones(1, 3, 2, 2, dtype=torch.long), error=(TypeError, "logits")),
    sl("labels 2-d", labels=lambda: torch.tensor([[0, 1], [2, 255]]), error=(ValueError, "labels")),
    sl("ignore_index float", ignore_index=255.0, error=(TypeError, "ignore_index")),
    sl("nothing labelled", labels=lambda: torch.full((1, 2, 2), 255), check=lambda loss: loss.item() == 0),
]


CASES: List[Case] = (MODE_DISTANCE_CASES + MMDL_CASES + SAMPLING_CASES + ENTROPY_CASES + HISTOGRAM_CASES
                     + SELECT_CASES + THRESHOLD_CASES + DRSL_LOSS_CASES + CONFUSION_CASES + RANKING_CASES
                     + RARE_CASES + MISC_CASES)


# ---------------------------------------------------------------- the audit


def tensors_of(out) -> List[Optional[torch.Tensor]]:
    """The tensors of an op's output (a tensor or a tuple of them), in order, None kept."""
    if out is None or isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in tensors_of(item)]


def assert_same(actual, expected) -> None:
    """Equal values, shapes and dtypes; floats to fp32 rounding, NaN and inf
    where the reference has them."""
    for got, want in zip(tensors_of(actual), tensors_of(expected), strict=True):
        if want is None:
            assert got is None
            continue
        assert got.shape == want.shape and got.dtype == want.dtype
        if want.dtype.is_floating_point:
            torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4, atol=1e-5, equal_nan=True)
        else:
            assert torch.equal(got.cpu(), want.cpu())


def assert_valid_samples(samples, labels: torch.Tensor, k: int) -> None:
    """sample_per_class draws at random, differently per backend: every drawn
    pixel is of its class, none twice, min(k, pixels of the class) of them."""
    B, C, _ = samples.index.shape
    flat = labels.flatten(1).long().cpu()
    index, count = samples.index.cpu(), samples.count.cpu()
    for b in range(B):
        for c in range(C):
            pixels = (flat[b] == c).nonzero().flatten()
            n = int(count[b, c])
            assert n == min(k, pixels.numel())
            drawn = index[b, c, :n]
            assert (index[b, c, n:] == -1).all() and drawn.unique().numel() == n
            assert all(int(flat[b, p]) == c for p in drawn)


def run(case: Case, backend: str, device: torch.device):
    kwargs = {key: to_device(value, device) for key, value in case.kwargs().items()}
    return RUNNERS[case.op](backend, device, **kwargs), kwargs


def assert_clear_error(case: Case, backend: str, device: torch.device, error: Tuple[Type[Exception], str]) -> None:
    kind, argument = error
    with pytest.raises(ERRORS) as raised:
        run(case, backend, device)
    message = str(raised.value)
    assert isinstance(raised.value, kind), f"{type(raised.value).__name__}: {message}"
    prefix = MESSAGE_PREFIX.get(case.op, case.op)
    assert message.startswith(prefix) and argument in message, message


AUDIT = [(case, backend) for case in CASES for backend in BACKENDS_OF[case.op]]


@pytest.mark.parametrize("case, backend", AUDIT, ids=[f"{c.op}-{c.name}-{b}" for c, b in AUDIT])
def test_bad_input(case: Case, backend: str, request):
    if backend in EMULATED:
        with emulating(request, backend):
            test_bad_input(case, "cpu", request)
        return
    device = torch.device("cpu") if backend in ("reference", "torch") else device_for(backend)
    reason = None if backend == "torch" else why_unavailable(backend, device)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    if case.error is not None or backend in case.refused_by:
        error = case.error or (TypeError, "emb" if case.op != "entropy_map" else "logits")
        assert_clear_error(case, backend, device, error)
        return
    out, kwargs = run(case, backend, device)
    if case.op == "sample_per_class":
        assert_valid_samples(out, kwargs["labels"], kwargs["k"])
    elif backend not in ("reference", "torch"):
        expected, _ = run(case, "reference", torch.device("cpu"))
        assert_same(out, expected)
    if case.check is not None:
        assert case.check(out) in (None, True)


def test_the_audit_is_several_hundred_cases():
    assert len(AUDIT) >= 500
