"""drsl_fast::consistency_triplets (the Eq. 6 triplet draw, docs/method.md §4)
against its plain-torch reference: the same draws give the same triplets, bit
for bit, on every backend (C++ CPU, the CUDA kernels emulated on the CPU and,
where a GPU is present, on it), over random problems with the edge cases in:
anchors or source pixels that do not count, classes or (class, mode) groups
with no source pixel, no labelled source pixel at all, empty inputs, draws of
0 and of the largest double below 1, labels of several integer dtypes."""
import pytest
import torch

from drsl_fast import reference
from drsl_fast.losses import consistency_triplets, sample_per_class

from conftest import backend_under_test

LARGEST_BELOW_ONE = float(torch.tensor(1.0, dtype=torch.float64).nextafter(torch.tensor(0.0, dtype=torch.float64)))


@pytest.fixture(params=["cpu", "cuda-emulated", "cuda"])
def backend(request):
    yield from backend_under_test(request, request.param)


def random_problem(seed: int):
    """Arguments of the op: C classes, M modes, anchors (Bt, S) and source
    pixels (Bs, P), some of which do not count (mode 255, a label out of range)."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda low, high: int(torch.randint(low, high, (1,), generator=g))
    C, M = draw(1, 6), draw(1, 4)
    Bt, S, Bs, P, pixels = draw(0, 3), draw(0, 9), draw(0, 3), draw(0, 13), draw(1, 20)
    anchor_index = torch.randint(0, pixels, (Bt, S), generator=g)
    anchor_label = torch.randint(0, C, (Bt, S), generator=g)
    anchor_mode = torch.randint(0, M, (Bt, S), generator=g, dtype=torch.uint8)
    anchor_mode[torch.rand(Bt, S, generator=g) < 0.2] = 255
    source_label = torch.randint(-1, C + 1, (Bs, P), generator=g)
    source_mode = torch.randint(0, M, (Bs, P), generator=g, dtype=torch.uint8)
    source_mode[torch.rand(Bs, P, generator=g) < 0.2] = 255
    if seed % 5 == 0:  # one class has no source pixel
        source_label[source_label == 0] = 255
    if seed % 11 == 0:  # no source pixel counts
        source_mode.fill_(255)
    draws = torch.rand(2, Bt, S, generator=g, dtype=torch.float64)
    if seed % 7 == 0:
        draws.fill_(0.0 if seed % 2 else LARGEST_BELOW_ONE)
    dtype = (torch.int64, torch.int32, torch.int16)[seed % 3]
    return anchor_index, anchor_label, anchor_mode, source_label.to(dtype), source_mode, draws, C, M, pixels


def run_op(args, device):
    moved = [a.to(device) if torch.is_tensor(a) else a for a in args]
    return [t.cpu() for t in torch.ops.drsl_fast.consistency_triplets(*moved)]


def test_op_matches_reference(backend):
    _, device = backend
    for seed in range(120):
        args = random_problem(seed)
        want = reference.consistency_triplets(*args)
        got = run_op(args, device)
        for name, a, b in zip(("anchor", "positive", "negative", "valid", "skipped"), got, want):
            assert torch.equal(a, b), (seed, name, a, b)


def test_triplets_keep_the_rule(backend):
    """Independently of the reference: a valid anchor's positive has its class
    and mode, its negative a labelled pixel of another class; skips are counted."""
    _, device = backend
    for seed in range(40):
        anchor_index, anchor_label, anchor_mode, source_label, source_mode, draws, C, M, pixels = args = (
            random_problem(seed))
        anchor, positive, negative, valid, skipped = run_op(args, device)
        label, mode = source_label.reshape(-1).long(), source_mode.reshape(-1).long()
        counts = (label >= 0) & (label < C) & (mode < M)
        has_label = anchor_mode != 255
        assert torch.equal(anchor >= 0, has_label)
        rows = torch.arange(anchor_index.shape[0])[:, None]
        assert torch.equal(anchor[has_label], (rows * pixels + anchor_index)[has_label])
        assert counts[positive[valid]].all() and counts[negative[valid]].all()
        assert torch.equal(label[positive[valid]], anchor_label[valid])
        assert torch.equal(mode[positive[valid]], anchor_mode[valid].long())
        assert (label[negative[valid]] != anchor_label[valid]).all()
        assert (positive[~valid] == -1).all() and (negative[~valid] == -1).all()
        assert int(valid.sum()) + int(skipped.max()) >= int(has_label.sum())


def test_drsl_loss_draws_the_same_triplets_on_every_backend(backend):
    """The loss's own call: same generator, same triplets as the reference backend."""
    name, device = backend
    g = torch.Generator().manual_seed(0)
    C, M, D = 4, 3, 5
    target, source = torch.randn(2, D, 7, 6, generator=g), torch.randn(2, D, 7, 6, generator=g)
    modes = torch.randn(C, M, D, generator=g)
    target_labels, source_labels = (torch.randint(0, C + 1, (2, 7, 6), generator=g) for _ in range(2))
    index, label = sample_per_class(target_labels, C, 5, torch.Generator().manual_seed(1)).pairs()
    want = consistency_triplets(target, index, label, source, source_labels, modes,
                                torch.Generator().manual_seed(2), backend="reference")
    on = lambda t: t.to(device)
    got = consistency_triplets(on(target), on(index), on(label), on(source), on(source_labels), on(modes),
                               torch.Generator(device).manual_seed(2), backend=name)
    if device.type == "cuda":  # the draws come from the device's generator: check the rule only
        assert int(got.valid.sum()) > 0
        return
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("bad, message", [
    (lambda a: a.__setitem__(0, a[0].int()), "int64"),
    (lambda a: a.__setitem__(2, a[2].long()), "uint8"),
    (lambda a: a.__setitem__(5, a[5].float()), "float64"),
    (lambda a: a.__setitem__(5, a[5][:, :, :1]), "draws"),
    (lambda a: a.__setitem__(3, a[3].float()), "integer"),
    (lambda a: a.__setitem__(4, a[4][:, :1]), "alike"),
    (lambda a: a.__setitem__(7, 17), "num_modes"),
    (lambda a: a.__setitem__(6, 0), "num_classes"),
])
def test_bad_inputs_raise(bad, message):
    args = [torch.ones(1, 3, dtype=torch.int64), torch.zeros(1, 3, dtype=torch.int64),
            torch.zeros(1, 3, dtype=torch.uint8), torch.zeros(1, 4, dtype=torch.int64),
            torch.zeros(1, 4, dtype=torch.uint8), torch.rand(2, 1, 3, dtype=torch.float64), 2, 1, 5]
    torch.ops.drsl_fast.consistency_triplets(*args)
    bad(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.drsl_fast.consistency_triplets(*args)


def test_opcheck():
    for seed in (1, 2, 4):
        torch.library.opcheck(torch.ops.drsl_fast.consistency_triplets, random_problem(seed),
                              test_utils=("test_schema", "test_faketensor"))


def test_emulated_kernels_have_no_order_dependence(emulated_cuda):
    """Threads run in forward and in reverse order: the same outputs (the skip
    counts are atomics; nothing else is shared)."""
    for seed in range(30):
        args = random_problem(seed)
        forward = emulated_cuda.consistency_triplets(*args)
        backward = emulated_cuda.consistency_triplets(*args, reverse=True)
        for a, b in zip(forward, backward):
            assert torch.equal(a, b)
