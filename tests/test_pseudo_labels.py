"""Class-balanced pseudo-labels (docs/method.md §5): the streaming histogram
thresholds against the exact sort-based ones, within the documented bound;
the label selection and the histogram on every backend against the reference."""
import math

import pytest
import torch

import drsl_fast
from drsl_fast.pseudo_labels import ClassBalancedThresholds, portion_for_round, select_labels
from drsl_fast import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
PORTIONS = [0.0, 0.01, 0.2, 0.35, 0.5, 1.0]


def crowded_probs(B, C, H, W, seed=0, sharpness=12.0, dtype=torch.float32):
    """Probabilities whose confidences crowd near 1, like a trained model's."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * sharpness
    return logits.softmax(1).to(dtype)


def assert_within_bound(hist, exact, mantissa_bits):
    """t <= t* and 1 - t <= max((1 - t*)(1 + 2^-k), 2^-24) + 2^-24 (module
    docstring of drsl_fast.pseudo_labels.thresholds), and the special values
    (1 for empty classes, inf for rank 0) exactly."""
    hist, exact = hist.cpu().double(), exact.double()
    special = torch.isinf(exact) | (exact == 1.0)
    assert torch.equal(hist[torch.isinf(exact)], exact[torch.isinf(exact)])
    h, e = hist[~special], exact[~special]
    assert (h <= e).all(), (h, e)
    bound = torch.maximum((1 - e) * (1 + 2.0**-mantissa_bits), torch.full_like(e, 2.0**-24)) + 2.0**-24
    assert ((1 - h) <= bound).all(), (h, e, bound)


def test_histogram_reference_counts_every_pixel_once():
    probs = crowded_probs(2, 4, 5, 7)
    counts = reference.confidence_histogram(probs, False, 8)
    assert counts.shape == (4, 1 + 24 * 256) and counts.dtype == torch.int64
    cls, _ = reference.pixel_confidence(probs, False)
    torch.testing.assert_close(counts.sum(1), torch.bincount(cls, minlength=4))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("from_logits", [False, True])
def test_histogram_matches_reference(fast_backend, dtype, from_logits):
    backend, device = fast_backend
    probs = crowded_probs(2, 19, 13, 11, seed=1, dtype=dtype)
    scores = probs.double().log().clamp(min=-80).to(dtype) if from_logits else probs
    counts = drsl_fast.ops.confidence_histogram(scores.to(device), from_logits, backend=backend).cpu()
    expected = reference.confidence_histogram(scores, from_logits, 8)
    if not from_logits:
        assert torch.equal(counts, expected)
    else:  # an ulp of exp/sum rounding may move a pixel across a (narrow) bin edge
        assert torch.equal(counts.sum(1), expected.sum(1))
        assert (counts - expected).abs().sum() <= 0.1 * expected.sum()


@pytest.mark.parametrize("case", ["channels_last", "odd", "one_class", "ties", "empty", "coarse_bins"])
def test_histogram_layouts_and_edge_cases(fast_backend, case):
    backend, device = fast_backend
    bits = 8
    if case == "channels_last":
        scores = crowded_probs(2, 5, 6, 7).contiguous(memory_format=torch.channels_last)
    elif case == "odd":
        scores = crowded_probs(3, 3, 1, 131, seed=4)[:, :, :, 1::2]
    elif case == "one_class":
        scores = torch.ones(2, 1, 5, 3)
    elif case == "ties":  # equal probabilities: class 0 wins, conf = 1/C
        scores = torch.full((1, 4, 3, 5), 0.25)
    elif case == "empty":
        scores = torch.zeros(0, 3, 4, 4)
    else:
        scores, bits = crowded_probs(1, 6, 9, 9, seed=5), 0
    counts = drsl_fast.ops.confidence_histogram(scores.to(device), False, bits, backend=backend).cpu()
    assert torch.equal(counts, reference.confidence_histogram(scores, False, bits))
    if case == "one_class":
        assert counts[0, 0] == 30 and counts.sum() == 30
    if case == "ties":
        assert counts[0].sum() == 15 and counts[1:].sum() == 0


def test_bins_are_monotone_and_as_fine_as_documented():
    # confidences from 0.05 to 1 - 2^-24, dense near 1
    gaps = torch.logspace(math.log10(2.0**-24), math.log10(0.95), 20000, dtype=torch.float64)
    conf = (1 - gaps).float().unique()  # ascending
    bins = reference.confidence_bin(conf, 8)
    assert (bins[1:] <= bins[:-1]).all()  # higher confidence -> lower bin
    acc = ClassBalancedThresholds(1, mantissa_bits=8)
    upper = acc.gap_upper_edges()
    lower = torch.cat([torch.zeros(1, dtype=torch.float64), upper[:-1]])
    gap = (1 - conf.double())
    assert (gap < upper[bins]).all() and (gap >= lower[bins]).all()
    inner = bins >= 2
    assert (upper[bins[inner]] <= lower[bins[inner]] * (1 + 2.0**-8)).all()
    assert reference.confidence_bin(torch.tensor([1.0, 1.5, 0.0, -1.0, float("nan")]), 8).tolist() == [
        0, 0, 6144, 6144, 6144]


@pytest.mark.parametrize("mantissa_bits", [4, 8])
def test_thresholds_within_bound_of_sorting(mantissa_bits):
    acc = ClassBalancedThresholds(19, mantissa_bits=mantissa_bits)
    exact = reference.SortedThresholds(19)
    for seed, sharpness in enumerate([2.0, 8.0, 30.0]):
        probs = crowded_probs(2, 19, 16, 24, seed=seed, sharpness=sharpness)
        probs[:, 7] = 0.0  # class 7 is never predicted: empty
        acc.update(probs)
        exact.update(probs)
    assert acc.pixels_per_class()[7] == 0
    for portion in PORTIONS:
        t, t_exact = acc.thresholds(portion), exact.thresholds(portion)
        assert t.dtype == torch.float32 and t.shape == (19,)
        assert t[7] == 1.0 and t_exact[7] == 1.0
        assert_within_bound(t, t_exact, mantissa_bits)
    assert torch.isinf(acc.thresholds(0.0)[:7]).all()


def test_thresholds_with_ties_and_a_single_class():
    # confidences from a handful of values: many ties at the rank
    g = torch.Generator().manual_seed(3)
    conf = torch.tensor([0.5, 0.75, 0.9, 0.99, 0.999, 1.0])[torch.randint(0, 6, (1, 1, 40, 40), generator=g)]
    probs = torch.cat([conf, 1 - conf], 1)
    acc, exact = ClassBalancedThresholds(2), reference.SortedThresholds(2)
    acc.update(probs)
    exact.update(probs)
    for portion in PORTIONS:
        assert_within_bound(acc.thresholds(portion), exact.thresholds(portion), 8)
    single, single_exact = ClassBalancedThresholds(1), reference.SortedThresholds(1)
    ones = torch.ones(2, 1, 3, 4)
    single.update(ones)
    single_exact.update(ones)
    for portion in PORTIONS:
        assert_within_bound(single.thresholds(portion), single_exact.thresholds(portion), 8)
        if portion > 0.1:
            assert (select_labels(ones, single.thresholds(portion)) == 0).all()


def test_thresholds_from_logits(fast_backend):
    backend, device = fast_backend
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 7, 9, 10, generator=g) * 10
    acc = ClassBalancedThresholds(7, device=device, backend=backend)
    acc.update(logits.to(device), from_logits=True)
    exact = reference.SortedThresholds(7)
    exact.update(logits, from_logits=True)
    for portion in PORTIONS:
        # a pixel may cross a bin edge by exp/sum rounding: one more bin of slack
        t, t_exact = acc.thresholds(portion).cpu().double(), exact.thresholds(portion).double()
        finite = torch.isfinite(t_exact) & (t_exact < 1)
        assert torch.equal(torch.isinf(t), torch.isinf(t_exact))
        assert ((1 - t[finite]) <= (1 - t_exact[finite]) * (1 + 2.0**-8) ** 2 + 2.0**-23).all()
        assert (t[finite] <= t_exact[finite] + 2.0**-23).all()


def test_merge_equals_one_shot_exactly(fast_backend):
    backend, device = fast_backend
    batches = [crowded_probs(1, 5, 8, 9, seed=s).to(device) for s in range(4)]
    one_shot = ClassBalancedThresholds(5, device=device, backend=backend)
    parts = [ClassBalancedThresholds(5, device=device, backend=backend) for _ in range(3)]
    for i, batch in enumerate(batches):
        one_shot.update(batch)
        parts[i % 3].update(batch)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert torch.equal(merged.counts, one_shot.counts)
    for portion in PORTIONS:
        assert torch.equal(merged.thresholds(portion), one_shot.thresholds(portion))
    # memory is fixed: the state does not grow with the number of images
    assert one_shot.counts.shape == (5, 1 + 24 * 256)


def test_state_dict_round_trip_and_ddp_sum():
    a, b = ClassBalancedThresholds(3), ClassBalancedThresholds(3)
    a.update(crowded_probs(1, 3, 4, 4, seed=1))
    b.update(crowded_probs(1, 3, 4, 4, seed=2))
    summed = ClassBalancedThresholds(3)
    summed.load_state_dict({"counts": a.counts + b.counts, "mantissa_bits": 8})  # what all_reduce(SUM) yields
    assert torch.equal(summed.thresholds(0.3), a.merge(b).thresholds(0.3))
    with pytest.raises(ValueError, match="another shape or resolution"):
        summed.load_state_dict({"counts": a.counts, "mantissa_bits": 4})
    with pytest.raises(ValueError, match="differ in num_classes"):
        a.merge(ClassBalancedThresholds(4))


def test_selection_with_histogram_thresholds_keeps_every_exactly_selected_pixel():
    probs = crowded_probs(2, 19, 20, 30, seed=9, sharpness=6.0)
    acc, exact = ClassBalancedThresholds(19), reference.SortedThresholds(19)
    acc.update(probs)
    exact.update(probs)
    for portion in (0.2, 0.5):
        labels = select_labels(probs, acc.thresholds(portion))
        exact_labels = reference.select_labels(probs, exact.thresholds(portion))
        assert ((exact_labels == 255) | (labels != 255)).all()
        disagreement = (labels != exact_labels).float().mean()
        assert disagreement < 0.01, disagreement


SELECT_CASES = ["random", "channels_last", "fp16", "bf16", "fp64", "inf_and_zero", "ties", "all_ignored", "one_class"]


@pytest.mark.parametrize("case", SELECT_CASES)
def test_select_labels_matches_reference(fast_backend, case):
    backend, device = fast_backend
    g = torch.Generator().manual_seed(2)
    probs = crowded_probs(2, 6, 7, 9, seed=3, sharpness=3.0)
    t = torch.rand(6, generator=g) * 0.6 + 0.3
    if case == "channels_last":
        probs = probs.contiguous(memory_format=torch.channels_last)
    elif case in ("fp16", "bf16", "fp64"):
        probs = probs.to({"fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}[case])
    elif case == "inf_and_zero":
        t[1], t[4] = float("inf"), 1e-30
    elif case == "ties":  # two classes with equal ratio: the lower one wins
        probs[:, 3] = probs[:, 2]
        t[3] = t[2]
    elif case == "all_ignored":
        t[:] = 2.0
    elif case == "one_class":
        probs, t = torch.ones(2, 1, 3, 5), torch.tensor([1.0])
    labels = select_labels(probs.to(device), t.to(device), backend=backend).cpu()
    expected = reference.select_labels(probs, t)
    assert labels.dtype == torch.uint8 and labels.shape == (probs.shape[0],) + tuple(probs.shape[2:])
    assert torch.equal(labels, expected)
    if case == "all_ignored":
        assert (labels == 255).all()
    if case == "inf_and_zero":
        assert not (labels == 1).any()
    if case == "ties":
        assert not (labels == 3).any()


def test_select_labels_follows_spec_formula():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.34, 0.33, 0.33]]).t().reshape(1, 3, 1, 3)
    t = torch.tensor([0.9, 0.5, 0.3])
    # ratios: pixel 0 (0.67, 0.6, 0.33) -> ignored; pixel 1 (0.22, 1.0, 1.0) -> tie -> 1;
    # pixel 2 (0.38, 0.66, 1.1) -> 2
    assert select_labels(probs, t).flatten().tolist() == [255, 1, 2]


def test_portion_schedule():
    assert [portion_for_round(r) for r in range(8)] == [0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.5]
    with pytest.raises(ValueError):
        portion_for_round(-1)


def test_opcheck_cpu_operators():
    from drsl_fast import _extension

    if not _extension.has_cpu_kernels():
        pytest.skip(f"extension missing: {_extension.LOAD_ERROR}")
    probs = crowded_probs(2, 4, 3, 5)
    torch.library.opcheck(torch.ops.drsl_fast.confidence_histogram.default, (probs, False, 6))
    torch.library.opcheck(torch.ops.drsl_fast.confidence_histogram.default, (probs.log(), True, 8))
    torch.library.opcheck(torch.ops.drsl_fast.select_labels.default, (probs, torch.full((4,), 0.5)))


def test_opcheck_triton_operators():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if drsl_fast.backends.why_unavailable("triton", device) is not None:
        pytest.skip(drsl_fast.backends.why_unavailable("triton", device))
    probs = crowded_probs(1, 3, 2, 5).to(device)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.drsl_fast.confidence_histogram_triton.default, (probs, False, 4), test_utils=utils)
    torch.library.opcheck(torch.ops.drsl_fast.select_labels_triton.default, (probs, torch.full((3,), 0.5, device=device)),
                          test_utils=utils)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: drsl_fast.ops.confidence_histogram(torch.rand(3, 4, 5)), ValueError, r"\(B, C, H, W\)"),
        (lambda: drsl_fast.ops.confidence_histogram(torch.ones(1, 2, 2, 2, dtype=torch.long)), TypeError, "float16"),
        (lambda: drsl_fast.ops.confidence_histogram(torch.rand(1, 2, 2, 2), mantissa_bits=17), ValueError, "mantissa"),
        (lambda: select_labels(torch.rand(1, 3, 2, 2), torch.rand(4)), ValueError, r"\(3,\) tensor"),
        (lambda: select_labels(torch.rand(1, 256, 1, 1), torch.rand(256)), ValueError, "C <= 255"),
        (lambda: ClassBalancedThresholds(3).update(torch.rand(1, 4, 2, 2)), ValueError, r"\(B, 3, H, W\)"),
        (lambda: ClassBalancedThresholds(3).thresholds(1.5), ValueError, "portion"),
    ],
)
def test_input_validation(call, error, match):
    with pytest.raises(error, match=match):
        call()
