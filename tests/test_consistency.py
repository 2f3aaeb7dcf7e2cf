"""Cross-domain mode consistency (docs/method.md Eq. 6): the drawn triplets obey the
docs/method.md §4 (class and mode of the positive, class of the negative), positives and
negatives are uniform over their candidate sets, skips are counted, and the
loss equals an independent per-triplet computation."""
import math

import pytest
import torch

from drsl_fast import reference
from drsl_fast.losses import (ConsistencyTriplets, consistency_hinge, consistency_loss, consistency_triplets,
                              sample_per_class)

from conftest import backend_under_test

C, M, D = 3, 2, 4


@pytest.fixture(params=["reference", "cpu", "cuda-emulated", "cuda"])
def any_backend(request):
    """(backend, device): the reference and each fast backend of the Eq. 6 ops."""
    yield from backend_under_test(request, request.param)


def domain_pair(seed=0, H=6, W=5):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(2, D, H, W, generator=g, dtype=torch.float64)
    source = torch.randn(2, D, H, W, generator=g, dtype=torch.float64)
    modes = torch.randn(C, M, D, generator=g, dtype=torch.float64)
    target_labels = torch.randint(0, C, (2, H, W), generator=g)
    target_labels[1, :2] = 255
    source_labels = torch.randint(0, C, (2, H, W), generator=g)
    source_labels[0, 0] = 255
    return target, target_labels, source, source_labels, modes


def source_modes(source, source_labels, modes):
    flat = source_labels.reshape(2, -1)
    every = torch.arange(flat.shape[1]).expand(2, -1)
    return reference.label_mode(source, every, flat, modes).reshape(-1).long(), flat.reshape(-1)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_triplets_follow_the_spec(backend):
    target, target_labels, source, source_labels, modes = domain_pair()
    index, label = sample_per_class(target_labels, C, 4, torch.Generator().manual_seed(0)).pairs()
    t = consistency_triplets(target, index, label, source, source_labels, modes,
                             torch.Generator().manual_seed(1), backend=backend)
    anchor_mode = reference.label_mode(target, index, label, modes).long()
    s_mode, s_label = source_modes(source, source_labels, modes)
    valid = t.valid
    assert int(valid.sum()) == int((index >= 0).sum()) - int(t.skipped_no_positive)
    assert torch.equal(s_label[t.positive[valid]], label[valid])
    assert torch.equal(s_mode[t.positive[valid]], anchor_mode[valid])
    negative_label = s_label[t.negative[valid]]
    assert (negative_label != label[valid]).all() and (negative_label < C).all()
    assert (t.positive[~valid] == -1).all() and (t.negative[~valid] == -1).all()


@pytest.mark.parametrize("draw", ["lowest", "highest"])
def test_extreme_draws_pick_inside_their_runs(draw, monkeypatch):
    """Draws of 0 and of the largest double below 1 still pick a positive of
    the anchor's (class, mode) and a negative of another class (no clamp
    guards the picks: draw * n rounds to below n)."""
    value = 0.0 if draw == "lowest" else float(torch.tensor(1.0, dtype=torch.float64).nextafter(torch.tensor(0.0)))
    rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: rand(*args, **kwargs).fill_(value))
    target, target_labels, source, source_labels, modes = domain_pair(seed=4)
    index, label = sample_per_class(target_labels, C, 4, torch.Generator().manual_seed(0)).pairs()
    t = consistency_triplets(target, index, label, source, source_labels, modes, torch.Generator(), backend="cpu")
    anchor_mode = reference.label_mode(target, index, label, modes).long()
    s_mode, s_label = source_modes(source, source_labels, modes)
    valid = t.valid
    assert valid.any()
    assert torch.equal(s_label[t.positive[valid]], label[valid])
    assert torch.equal(s_mode[t.positive[valid]], anchor_mode[valid])
    negative_label = s_label[t.negative[valid]]
    assert (negative_label != label[valid]).all() and (negative_label < C).all()


def test_positives_and_negatives_are_uniform():
    """One anchor, many draws: its positive is uniform over the source pixels
    of its (class, mode) group, its negative uniform over other-class pixels."""
    target, target_labels, source, source_labels, modes = domain_pair(seed=3, H=8, W=8)
    index = torch.tensor([[5], [0]])
    label = target_labels.reshape(2, -1)[:, :1].clone()
    label[0, 0] = 1
    index[1, 0] = -1
    anchor_mode = int(reference.label_mode(target, index, label, modes)[0, 0])
    s_mode, s_label = source_modes(source, source_labels, modes)
    candidates = ((s_label == 1) & (s_mode == anchor_mode)).nonzero().squeeze(1)
    others = ((s_label != 1) & (s_label < C)).nonzero().squeeze(1)
    g = torch.Generator().manual_seed(4)
    draws = 4000
    pos_hits = torch.zeros(s_label.numel())
    neg_hits = torch.zeros(s_label.numel())
    for _ in range(draws // 50):  # 50 copies of the anchor per call
        t = consistency_triplets(target, index.repeat(1, 50), label.repeat(1, 50), source, source_labels, modes, g)
        pos_hits += torch.bincount(t.positive[0], minlength=s_label.numel())
        neg_hits += torch.bincount(t.negative[0], minlength=s_label.numel())
    for hits, support in ((pos_hits, candidates), (neg_hits, others)):
        assert hits.sum() == draws and hits[support].sum() == draws
        expected = draws / support.numel()
        stat = float(((hits[support] - expected) ** 2 / expected).sum())
        assert abs((stat - (support.numel() - 1)) / math.sqrt(2 * (support.numel() - 1))) < 5


def test_skips_are_counted():
    target, target_labels, source, source_labels, modes = domain_pair()
    index, label = sample_per_class(target_labels, C, 3, torch.Generator().manual_seed(0)).pairs()
    no_class_2 = torch.where(source_labels == 2, 255, source_labels)
    out = consistency_loss(target, index, label, source, no_class_2, modes, generator=torch.Generator())
    anchors_of_2 = int(((label == 2) & (index >= 0)).sum())
    assert int(out.skipped_no_positive) >= anchors_of_2
    only_class_0 = torch.zeros_like(source_labels)
    out = consistency_loss(target, index, label, source, only_class_0, modes, generator=torch.Generator())
    assert int(out.skipped_no_negative) == int(((label == 0) & (index >= 0)).sum())
    nothing = consistency_loss(target, index, label, source, torch.full_like(source_labels, 255), modes)
    assert float(nothing.loss) == 0 and int(nothing.anchors) == 0


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_loss_matches_independent_hinge(backend):
    target, target_labels, source, source_labels, modes = domain_pair(seed=7)
    index, label = sample_per_class(target_labels, C, 4, torch.Generator().manual_seed(2)).pairs()
    t = consistency_triplets(target, index, label, source, source_labels, modes, torch.Generator().manual_seed(5),
                             backend=backend)
    out = consistency_loss(target.requires_grad_(), index, label, source.requires_grad_(), source_labels, modes,
                           beta=1.0, generator=torch.Generator().manual_seed(5), backend=backend)
    P = target.shape[2] * target.shape[3]
    total, used = 0.0, 0
    for a, p, n in zip(t.anchor[t.valid].tolist(), t.positive[t.valid].tolist(), t.negative[t.valid].tolist()):
        e_t = target[a // P, :, (a % P) // 5, a % 5]
        e_p = source[p // P, :, (p % P) // 5, p % 5]
        e_n = source[n // P, :, (n % P) // 5, n % 5]
        total += max(0.0, float(((e_t - e_p) ** 2).sum() - ((e_t - e_n) ** 2).sum() + 1.0))
        used += 1
    assert used > 0 and int(out.anchors) == used
    torch.testing.assert_close(out.loss, torch.tensor(total / used, dtype=torch.float64))
    out.loss.backward()
    assert target.grad.abs().sum() > 0 and source.grad.abs().sum() > 0


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 4), (1, 4, 6)], ids=["two-images", "one-image"])
def test_hinge_gradient_matches_autograd_of_the_formula(any_backend, layout, shape):
    """Eq. 6's gradient (drsl_fast::consistency_hinge's kernels, or the
    reference's autograd) against autograd through plain indexing (float64),
    with repeated anchors, a pixel that is both a positive and a negative, an
    absent triplet (positions -1, as the draw leaves them) and a non-finite
    value at the pixel the absent anchor points at; and gradcheck. 24 pixels
    in two images or in one."""
    backend, device = any_backend
    B, H, W = shape
    g = torch.Generator().manual_seed(3)
    target = torch.randn(B, D, H, W, generator=g, dtype=torch.float64).to(device)
    source = (torch.randn(B, D, H, W, generator=g, dtype=torch.float64) * 0.3).to(device)
    if layout == "channels_last":
        target, source = (t.contiguous(memory_format=torch.channels_last) for t in (target, source))
    anchor = torch.tensor([[5, 5, 17, 0, 9, 22]], device=device)
    positive = torch.tensor([[3, 14, 3, -1, 7, 7]], device=device)
    negative = torch.tensor([[14, 7, 20, -1, 3, 23]], device=device)
    valid = positive >= 0
    triplets = ConsistencyTriplets(anchor, positive, negative, valid, torch.tensor(0), torch.tensor(0))

    def formula(t, s):
        rows = lambda e, flat: e.permute(0, 2, 3, 1).reshape(-1, D)[flat[valid]]
        e_t, e_p, e_n = rows(t, anchor), rows(s, positive), rows(s, negative)
        hinge = ((e_t - e_p) ** 2).sum(-1) - ((e_t - e_n) ** 2).sum(-1) + 1.0
        return torch.relu(hinge).sum() / valid.sum()

    got, want = [], []
    for fn, out in ((lambda t, s: consistency_hinge(t, s, triplets, backend=backend)[0], got), (formula, want)):
        t, s = target.clone().requires_grad_(), source.clone().requires_grad_()
        loss = fn(t, s)
        loss.backward()
        out += [loss.detach(), t.grad, s.grad]
    assert float(got[0]) > 0
    for a, b in zip(got, want):
        assert a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert int(consistency_hinge(target, source, triplets, backend=backend)[1]) == 5
    poisoned_target, poisoned_source = target.clone(), source.clone()
    poisoned_target[0, :, 0, 0] = float("inf")  # flat 0: the absent triplet's anchor
    poisoned_source[0, :, 0, 0] = float("nan")  # read by nothing
    t, s = poisoned_target.requires_grad_(), poisoned_source.requires_grad_()
    consistency_hinge(t, s, triplets, backend=backend)[0].backward()
    assert torch.isfinite(t.grad).all() and torch.isfinite(s.grad).all()
    # CUDA adds rows shared by several triplets with atomics: two backward passes may differ in the last bits
    nondet_tol = 1e-12 if device.type == "cuda" else 0.0
    assert torch.autograd.gradcheck(lambda t, s: consistency_hinge(t, s, triplets, backend=backend)[0],
                                    (target.clone().requires_grad_(), source.clone().requires_grad_()),
                                    nondet_tol=nondet_tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hinge_in_low_precision_matches_the_reference(any_backend, dtype):
    """Half-precision embeddings: the loss in fp32 and the gradients in the
    embeddings' dtype, within the rounding of the inputs' own precision."""
    backend, device = any_backend
    g = torch.Generator().manual_seed(8)
    target = torch.randn(2, 16, 5, 7, generator=g).to(device, dtype)
    source = torch.randn(1, 16, 6, 3, generator=g).to(device, dtype)
    n = 40
    anchor = torch.randint(-1, 70, (2, n), generator=g).to(device)
    positive = torch.randint(-1, 18, (2, n), generator=g).to(device)
    negative = torch.randint(0, 19, (2, n), generator=g).to(device)
    triplets = ConsistencyTriplets(anchor, positive, negative, positive >= 0, torch.tensor(0), torch.tensor(0))
    results = []
    for name in (backend, "reference"):
        t, s = target.clone().requires_grad_(), source.clone().requires_grad_()
        loss, used = consistency_hinge(t, s, triplets, backend=name)
        loss.backward()
        results.append((loss, used, t.grad, s.grad))
    (loss, used, gt, gs), (ref_loss, ref_used, ref_gt, ref_gs) = results
    assert loss.dtype == torch.float32 and gt.dtype == dtype and gs.dtype == dtype
    assert int(used) == int(ref_used) and 0 < int(used) < 2 * n
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss, ref_loss, **tolerance)
    torch.testing.assert_close(gt.float(), ref_gt.float(), **tolerance)
    torch.testing.assert_close(gs.float(), ref_gs.float(), **tolerance)


def test_cpu_hinge_reads_planes_and_rows_alike():
    """The CPU kernels read channel-major maps a plane at a time and other
    layouts a row at a time, the triplets split among the threads: every
    layout and thread count gives the same bits, and they match the float64
    reference. 1500 triplets, D = 37, repeated and absent positions."""
    g = torch.Generator().manual_seed(10)
    target = torch.randn(2, 37, 9, 11, generator=g, dtype=torch.float64)
    source = torch.randn(3, 37, 8, 7, generator=g, dtype=torch.float64)
    anchor = torch.randint(-1, 2 * 99, (3, 500), generator=g)
    positive = torch.randint(-1, 3 * 56, (3, 500), generator=g)
    negative = torch.randint(0, 3 * 56, (3, 500), generator=g)
    triplets = ConsistencyTriplets(anchor, positive, negative, positive >= 0, torch.tensor(0), torch.tensor(0))
    channels_last = lambda t: t.contiguous(memory_format=torch.channels_last)
    results = {}
    threads = torch.get_num_threads()
    for name, t0, s0, backend, num_threads in (
            ("reference", target, source, "reference", threads),
            ("planes", target.float(), source.float(), "cpu", max(2, threads)),
            ("planes, one thread", target.float(), source.float(), "cpu", 1),
            ("rows", channels_last(target.float()), channels_last(source.float()), "cpu", threads),
            ("mixed", target.float(), channels_last(source.float()), "cpu", threads)):
        torch.set_num_threads(num_threads)
        t, s = t0.clone().requires_grad_(), s0.clone().requires_grad_()
        loss, used = consistency_hinge(t, s, triplets, backend=backend)
        loss.backward()
        results[name] = [loss, used, t.grad.contiguous(), s.grad.contiguous()]
    torch.set_num_threads(threads)
    assert 0 < int(results["planes"][1]) < anchor.numel()
    for name in ("planes, one thread", "rows", "mixed"):
        for got, want in zip(results[name], results["planes"]):
            assert torch.equal(got, want), name
    for got, want in zip(results["planes"], results["reference"]):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5)


def test_hinge_op_passes_opcheck():
    g = torch.Generator().manual_seed(9)
    anchor, positive, negative = (torch.randint(-1, 12, (3, 7), generator=g) for _ in range(3))
    channels_last = torch.randn(2, 6, 3, 5, generator=g, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    # contiguous, and a channel slice of channels-last (its gradient contiguous on both sides of the check)
    for target in (torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64), channels_last[:, :4]):
        for source in (torch.randn(12, 4, generator=g, dtype=torch.float64),
                       torch.randn(4, 12, generator=g, dtype=torch.float64).t()):  # (N, D) rows, a transposed view
            torch.library.opcheck(torch.ops.drsl_fast.consistency_hinge,
                                  (target.detach().requires_grad_(), source.requires_grad_(), anchor, positive,
                                   negative, 1.0))


def test_no_host_synchronisation_on_cpu():
    """No .item()/nonzero/data-dependent shapes: every op runs under a mode that
    forbids _local_scalar_dense and nonzero."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ForbidSync(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            assert "_local_scalar_dense" not in name and "nonzero" not in name, name
            return func(*args, **(kwargs or {}))

    target, target_labels, source, source_labels, modes = domain_pair()
    with ForbidSync():
        index, label = sample_per_class(target_labels, C, 4, torch.Generator().manual_seed(0), backend="cpu").pairs()
        out = consistency_loss(target, index, label, source, source_labels, modes, generator=torch.Generator(),
                               backend="cpu")
    assert out.loss.dim() == 0


def test_every_fast_backend_on_its_device(fast_backend):
    """The triplet rules of Eq. 6 hold on the fast backend's own device (the
    CUDA backend runs here where a GPU is present)."""
    backend, device = fast_backend
    target, target_labels, source, source_labels, modes = domain_pair(seed=5)
    index, label = sample_per_class(target_labels, C, 4, torch.Generator().manual_seed(0)).pairs()
    on = lambda t: t.to(device)
    t = consistency_triplets(on(target.float()), on(index), on(label), on(source.float()), on(source_labels),
                             on(modes.float()), torch.Generator(device=device).manual_seed(1), backend=backend)
    positive, negative, valid = t.positive.cpu(), t.negative.cpu(), t.valid.cpu()
    anchor_mode = reference.label_mode(target, index, label, modes).long()
    s_mode, s_label = source_modes(source, source_labels, modes)
    assert int(valid.sum()) == int((index >= 0).sum()) - int(t.skipped_no_positive)
    assert torch.equal(s_label[positive[valid]], label[valid])
    assert torch.equal(s_mode[positive[valid]], anchor_mode[valid])
    assert (s_label[negative[valid]] != label[valid]).all()
