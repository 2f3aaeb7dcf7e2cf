"""Semantic-segmentation evaluation of docs/method.md §9, streamed on the device.

:class:`ConfusionMatrix` accumulates a (C, C) int64 matrix (rows: ground truth,
columns: prediction) over pixels whose ground truth is in [0, C) (255 and any
other value ignored), batch by batch with ``torch.bincount``: memory is flat
over the dataset. Logits are upsampled bilinearly to the label resolution
before the argmax, one image at a time.

IoU follows the official Cityscapes evaluation: ``TP / (TP + FP + FN)`` with
FP counted over pixels with a valid ground truth only; NaN when the class
neither occurs nor is predicted; mIoU is the mean over the non-NaN classes.

Reports (:func:`report`) list the classes in the papers' column order
(Cityscapes train ids):
  "19"  all 19 classes;
  "16"  the SYNTHIA protocol: without terrain, truck, train; from a 16-class
        model's matrix, or the 16 classes' IoUs of a 19-class matrix;
  "13"  mIoU*: the 16 classes without wall, fence, pole.
"""
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .data.labels import CITYSCAPES_CLASSES, DROPPED_16_TO_13, DROPPED_19_TO_16, SYNTHIA_CLASSES
from .ops.validation import (check_bool, check_choice, check_dim, check_float_tensor, check_int,
                             check_integer_tensor, check_no_nan, check_tensor, describe)


class ConfusionMatrix:
    """Streaming confusion matrix on ``device``.

    Args:
        num_classes: C.
        device: where the matrix lives (the model's device).
        align_corners: of the bilinear upsampling of logits; True as in
            ADVENT's and CRST's evaluation code.
    """

    def __init__(self, num_classes: int, device=None, align_corners: bool = True):
        self.num_classes = check_int("ConfusionMatrix", "num_classes", num_classes, 1)
        self.align_corners = check_bool("ConfusionMatrix", "align_corners", align_corners)
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, prediction: Tensor, label: Tensor) -> None:
        """Adds a batch. ``prediction``: scores (B, C, h, w) (logits or
        probabilities, floating point, upsampled to the label size) or class
        ids (B, H, W) (an integer dtype); ``label``: ground-truth train ids
        (B, H, W) of an integer dtype, values outside [0, C) (255) ignored.

        Rejected, because no count would be right: float labels or class ids
        (they would be truncated), class ids outside [0, C) (-1 and 255
        included), NaN scores (they have no argmax) and scores without pixels
        for a label with pixels. Ids and NaN are checked on the host (one
        synchronisation per batch). Empty batches add nothing.
        """
        op = "ConfusionMatrix.update"
        check_integer_tensor(op, "label", label, "ground-truth train ids")
        check_dim(op, "label", label, (3,), "(B, H, W)")
        check_tensor(op, "prediction", prediction)
        label = label.to(self.matrix.device)
        if prediction.dim() == 4:
            self._add_scores(prediction, label)
        elif prediction.shape == label.shape:
            self._add_ids(prediction, label)
        else:
            raise ValueError(f"{op}: prediction must be (B, C, h, w) scores or class ids shaped like the label "
                             f"{tuple(label.shape)}, got shape {tuple(prediction.shape)}")

    def _add_scores(self, scores: Tensor, label: Tensor) -> None:
        op = "ConfusionMatrix.update"
        check_float_tensor(op, "prediction", scores)
        if scores.shape[1] != self.num_classes:
            raise ValueError(f"{op}: prediction scores have {scores.shape[1]} classes, expected {self.num_classes} "
                             f"(num_classes)")
        if scores.shape[0] != label.shape[0]:
            raise ValueError(f"{op}: prediction scores have B={scores.shape[0]} images but the label has "
                             f"B={label.shape[0]}; they must match")
        if label.numel() == 0:
            return
        if scores.shape[2] * scores.shape[3] == 0:
            raise ValueError(f"{op}: prediction scores have no pixels (shape {tuple(scores.shape)}) to upsample "
                             f"to the label's {tuple(label.shape[1:])}")
        check_no_nan(op, "prediction", scores, "a NaN score has no argmax")
        for image_scores, target in zip(scores, label):  # one upsampled image at a time
            self.matrix += self._counts(self.upsampled_argmax(image_scores[None], target.shape)[0], target)

    def _add_ids(self, ids: Tensor, label: Tensor) -> None:
        check_integer_tensor("ConfusionMatrix.update", "prediction", ids, "class ids")
        ids = ids.to(self.matrix.device)
        outside = (ids < 0) | (ids >= self.num_classes)
        if bool(outside.any()):
            values = ids[outside]
            raise ValueError(f"ConfusionMatrix.update: prediction class ids must be in [0, {self.num_classes}), "
                             f"got {values.numel()} outside, from {int(values.min())} to {int(values.max())}")
        self.matrix += self._counts(ids, label)

    def upsampled_argmax(self, scores: Tensor, size: Tuple[int, int]) -> Tensor:
        if tuple(scores.shape[-2:]) != tuple(size):
            scores = F.interpolate(scores.float(), size=tuple(size), mode="bilinear", align_corners=self.align_corners)
        return scores.argmax(1).to(self.matrix.device)

    def _counts(self, prediction: Tensor, label: Tensor) -> Tensor:
        """Counts of (label, prediction) pairs; ``prediction`` in [0, C)."""
        C = self.num_classes
        label, prediction = label.long().flatten(), prediction.long().flatten()
        valid = (label >= 0) & (label < C)
        # invalid pixels go to an extra bin that is dropped: no data-dependent shapes
        index = torch.where(valid, label * C + prediction, C * C)
        return torch.bincount(index, minlength=C * C + 1)[: C * C].view(C, C)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"ConfusionMatrix.merge: other must be a ConfusionMatrix, got {describe(other)}")
        if other.num_classes != self.num_classes:
            raise ValueError("ConfusionMatrix.merge: different numbers of classes")
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def all_reduce(self, group=None) -> None:
        """Sums the matrix over the ranks of a torch.distributed group."""
        torch.distributed.all_reduce(self.matrix, group=group)

    def reset(self) -> None:
        self.matrix.zero_()

    def iou(self) -> Tensor:
        return per_class_iou(self.matrix)

    def miou(self) -> float:
        return float(self.iou().nanmean())


def per_class_iou(matrix: Tensor) -> Tensor:
    """IoU per class (float64) of a (C, C) confusion matrix (rows: ground
    truth); NaN where TP + FP + FN = 0."""
    check_square_matrix("per_class_iou", "matrix", matrix)
    m = matrix.double()
    tp = m.diagonal()
    union = m.sum(0) + m.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def check_square_matrix(op: str, name: str, matrix) -> None:
    """``matrix`` must be a real (C, C) tensor."""
    check_tensor(op, name, matrix)
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.dtype.is_complex or matrix.dtype == torch.bool:
        raise ValueError(f"{op}: {name} must be a real (C, C) confusion matrix, got {describe(matrix)}")


@dataclass(frozen=True)
class Report:
    """Per-class IoU (in [0, 1], NaN for absent classes) in column order."""

    protocol: str
    names: Tuple[str, ...]
    iou: Tuple[float, ...]

    @property
    def miou(self) -> float:
        present = [v for v in self.iou if v == v]
        return sum(present) / len(present) if present else float("nan")

    def markdown(self) -> str:
        label = "mIoU*" if self.protocol == "13" else "mIoU"
        header = "| " + " | ".join(self.names) + f" | {label} |"
        cells = ["-" if v != v else f"{100 * v:.1f}" for v in self.iou]
        return "\n".join([header, "|" + "---|" * (len(self.names) + 1),
                          "| " + " | ".join(cells) + f" | {100 * self.miou:.1f} |"])


def report(confusion, protocol: str = "19") -> Report:
    """The per-class table and mean of ``protocol`` "19", "16" or "13" (see
    the module docstring) from a :class:`ConfusionMatrix` or a (C, C) matrix
    with C = 19 (Cityscapes train ids) or 16 (SYNTHIA's 16 classes)."""
    if not isinstance(confusion, (ConfusionMatrix, Tensor)):
        raise TypeError(f"report: confusion must be a ConfusionMatrix or a (C, C) tensor, got {describe(confusion)}")
    check_choice("report", "protocol", protocol, ("19", "16", "13"))
    matrix = confusion.matrix if isinstance(confusion, ConfusionMatrix) else confusion
    check_square_matrix("report", "confusion", matrix)
    iou = per_class_iou(matrix).tolist()
    C = matrix.shape[0]
    if C == 19:
        names = CITYSCAPES_CLASSES
    elif C == 16:
        names = SYNTHIA_CLASSES
    else:
        raise ValueError(f"report: confusion must be a 19- or 16-class confusion matrix, got {C} classes")
    if protocol == "19":
        if C != 19:
            raise ValueError("report: the 19-class protocol needs a 19-class confusion matrix, got 16 classes")
        return Report("19", tuple(names), tuple(iou))
    if C == 19:
        names, iou = drop(names, iou, DROPPED_19_TO_16)
    if protocol == "13":
        names, iou = drop(names, iou, DROPPED_16_TO_13)
    return Report(protocol, names, iou)


def drop(names, values, dropped: Tuple[int, ...]) -> Tuple[tuple, tuple]:
    kept = [i for i in range(len(names)) if i not in dropped]
    return tuple(names[i] for i in kept), tuple(values[i] for i in kept)

