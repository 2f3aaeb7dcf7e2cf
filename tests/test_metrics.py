"""Evaluation (docs/method.md §9) against an independent numpy implementation of the
official Cityscapes IoU definition, on the same predictions."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from drsl_fast.data.labels import CITYSCAPES_CLASSES, SYNTHIA_CLASSES
from drsl_fast.evaluation import ConfusionMatrix, per_class_iou, report


def official_iou(predictions, labels, num_classes):
    """Cityscapes evalPixelLevelSemanticLabeling's definition, pixel by pixel in
    numpy: over pixels with a ground truth among the evaluated classes,
    tp = pred == gt == c, fn = gt == c != pred, fp = pred == c != gt;
    IoU = tp / (tp + fp + fn), NaN when that is 0."""
    gt = np.concatenate([l.reshape(-1) for l in labels]).astype(np.int64)
    pred = np.concatenate([p.reshape(-1) for p in predictions]).astype(np.int64)
    evaluated = gt < num_classes
    gt, pred = gt[evaluated], pred[evaluated]
    iou = []
    for c in range(num_classes):
        tp = np.count_nonzero((gt == c) & (pred == c))
        fn = np.count_nonzero((gt == c) & (pred != c))
        fp = np.count_nonzero((gt != c) & (pred == c))
        iou.append(tp / (tp + fp + fn) if tp + fp + fn > 0 else float("nan"))
    return np.array(iou)


def random_batches(num_classes, seed=0, batches=3, size=(2, 23, 31), logit_size=(6, 8), absent=(5, 14)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        label = torch.randint(0, num_classes, size, generator=g)
        for c in absent:  # classes that never occur in the ground truth
            label[label == c] = 255
        label[torch.rand(size, generator=g) < 0.2] = 255
        logits = torch.randn((size[0], num_classes) + logit_size, generator=g)
        out.append((logits, label.to(torch.uint8)))
    return out


@pytest.mark.parametrize("align_corners", [True, False])
def test_matches_official_definition_on_upsampled_logits(align_corners):
    batches = random_batches(19)
    confusion = ConfusionMatrix(19, align_corners=align_corners)
    predictions, labels = [], []
    for logits, label in batches:
        confusion.update(logits, label)
        up = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=align_corners)
        predictions.append(up.argmax(1).numpy())
        labels.append(label.numpy())
    expected = official_iou(predictions, labels, 19)
    np.testing.assert_array_equal(np.isnan(expected), torch.isnan(confusion.iou()).numpy())
    np.testing.assert_allclose(confusion.iou().numpy(), expected, rtol=0, atol=1e-15, equal_nan=True)
    assert confusion.miou() == pytest.approx(np.nanmean(expected), abs=1e-15)
    # class 5 is predicted somewhere but never in the ground truth: IoU 0, not NaN
    assert confusion.iou()[5] == 0.0


def test_class_ids_streaming_merge_and_flat_memory():
    g = torch.Generator().manual_seed(1)
    whole = ConfusionMatrix(4)
    parts = [ConfusionMatrix(4), ConfusionMatrix(4)]
    preds, labels = [], []
    for i in range(6):
        pred = torch.randint(0, 4, (1, 7, 9), generator=g)
        label = torch.randint(0, 6, (1, 7, 9), generator=g)  # 4, 5: outside [0, C) -> ignored
        label[0, 0, :3] = 255
        whole.update(pred, label)
        parts[i % 2].update(pred, label)
        preds.append(pred.numpy())
        labels.append(label.numpy())
    assert torch.equal(parts[0].merge(parts[1]).matrix, whole.matrix)
    assert whole.matrix.shape == (4, 4) and whole.matrix.dtype == torch.int64
    np.testing.assert_allclose(whole.iou().numpy(), official_iou(preds, labels, 4), atol=1e-15)
    assert int(whole.matrix.sum()) == sum(int((l < 4).sum()) for l in labels)


def test_no_class_present_gives_nan():
    confusion = ConfusionMatrix(3)
    confusion.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 255, dtype=torch.uint8))
    assert torch.isnan(confusion.iou()).all() and confusion.matrix.sum() == 0


def test_reports_in_paper_column_order():
    batches = random_batches(19, seed=2, absent=())
    confusion = ConfusionMatrix(19)
    for logits, label in batches:
        confusion.update(logits, label)
    iou = confusion.iou().tolist()
    r19 = report(confusion, "19")
    assert r19.names == CITYSCAPES_CLASSES and r19.names[:3] == ("road", "sidewalk", "building")
    assert r19.miou == pytest.approx(np.nanmean(iou))
    r16 = report(confusion, "16")
    assert len(r16.names) == 16 and not {"terrain", "truck", "train"} & set(r16.names)
    assert r16.iou == tuple(v for i, v in enumerate(iou) if i not in (9, 14, 16))
    r13 = report(confusion, "13")
    assert r13.names == ("road", "sidewalk", "building", "traffic light", "traffic sign", "vegetation", "sky",
                         "person", "rider", "car", "bus", "motorcycle", "bicycle")
    assert r13.iou == tuple(v for i, v in enumerate(iou) if i not in (3, 4, 5, 9, 14, 16))
    table = r13.markdown()
    assert "mIoU*" in table and table.splitlines()[0].startswith("| road | sidewalk |")


def test_reports_of_a_sixteen_class_model():
    matrix = torch.diag(torch.arange(1, 17)) + 1
    r16, r13 = report(matrix, "16"), report(matrix, "13")
    assert r16.names == SYNTHIA_CLASSES
    assert r13.iou == tuple(v for i, v in enumerate(per_class_iou(matrix).tolist()) if i not in (3, 4, 5))
    with pytest.raises(ValueError, match="19-class protocol"):
        report(matrix, "19")


def test_input_validation():
    confusion = ConfusionMatrix(3)
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="label must be"):
        confusion.update(torch.zeros(1, 3, 2, 2), labels[0])
    with pytest.raises(ValueError, match="scores have 4 classes"):
        confusion.update(torch.zeros(1, 4, 2, 2), labels)
    with pytest.raises(ValueError, match="class ids shaped like the label"):
        confusion.update(torch.zeros(1, 3, 3, dtype=torch.long), labels)
