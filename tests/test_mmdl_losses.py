"""Fused MMDL losses (docs/method.md Eq. 4, 5) and label_mode on every backend,
against the reference and an independent per-sample formulation, with
gradients (float64 gradcheck) and DRSLLoss (Eq. 7-10)."""
import pytest
import torch

from conftest import backend_under_test
from drsl_fast.losses import DRSLLoss, in_mode_variance, label_mode, mmdl_losses, sample_per_class

SIGMA, ALPHA, SCALE = 0.5, 1.0, 15.0


@pytest.fixture(params=["cpu", "cuda", "triton", "cuda-emulated"])
def fast_backend(request):
    """Each fast backend available here, with the device it runs on; and the
    CUDA kernels emulated on the CPU (tests/cuda_on_cpu) in place of the CPU
    kernels, so that their logic is checked without a GPU."""
    yield from backend_under_test(request, request.param)


def case(dtype=torch.float64, seed=0, B=2, D=5, H=6, W=7, C=4, M=3, S=23, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    emb = (torch.randn(B, D, H, W, generator=g) * 0.6).to(dtype)
    if layout == "channels_last":
        emb = emb.contiguous(memory_format=torch.channels_last)
    modes = (torch.randn(C, M, D, generator=g) * 0.6).to(dtype)
    index = torch.randint(-1, H * W, (B, S), generator=g)
    label = torch.randint(0, C, (B, S), generator=g)
    label[0, :3] = 255  # ignored
    return emb, index, label, modes


def independent(emb, index, label, modes):
    """Eq. 4/5 with per-sample Python loops and torch.cdist, float64."""
    B, D = emb.shape[:2]
    C, M, _ = modes.shape
    rows = emb.double().flatten(2)
    centres = modes.double().reshape(C * M, D)
    tri = torch.zeros(index.shape, dtype=torch.float64)
    ce = torch.zeros(index.shape, dtype=torch.float64)
    for b in range(B):
        for s in range(index.shape[1]):
            p, y = int(index[b, s]), int(label[b, s])
            if not (0 <= p < rows.shape[2] and 0 <= y < C):
                continue
            d = torch.cdist(rows[b, :, p][None], centres, compute_mode="donot_use_mm_for_euclid_dist")[0] ** 2
            dmin = d.view(C, M).min(1).values
            wrong = torch.cat([dmin[:y], dmin[y + 1:]])
            tri[b, s] = max(0.0, float(dmin[y] - wrong.min() + ALPHA)) if C > 1 else 0.0
            logits = SCALE * torch.exp(-dmin / (2 * SIGMA**2))
            ce[b, s] = -torch.log_softmax(logits, 0)[y]
    return tri, ce


def fast_backends(dtype=torch.float64):
    """Fast backends that run on CPU tensors here (triton: under the
    interpreter) and support ``dtype`` (triton computes in fp32 and refuses
    float64)."""
    from drsl_fast.backends import why_unavailable

    return [
        b for b in ("cpu", "cuda", "triton")
        if why_unavailable(b, torch.device("cpu")) is None and not (b == "triton" and dtype == torch.float64)
    ]


# fp32 backends against the float64 reference: only the accumulation differs.
FP32_TOLERANCE = dict(atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_per_sample_values_match_independent_formulas(backend, layout):
    emb, index, label, modes = case(layout=layout)
    out = mmdl_losses(emb, index, label, modes, SIGMA, ALPHA, SCALE, reduction="none", backend=backend)
    tri, ce = independent(emb, index, label, modes)
    torch.testing.assert_close(out.triplet, tri, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out.ce, ce, atol=1e-10, rtol=1e-10)
    valid = (index >= 0) & (label < 4)
    assert int(out.count) == int(valid.sum())
    mean = mmdl_losses(emb, index, label, modes, backend=backend)
    torch.testing.assert_close(mean.triplet, tri.sum() / valid.sum())
    torch.testing.assert_close(mean.ce, ce.sum() / valid.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    emb, index, label, modes = case(dtype=dtype, seed=1, D=16, C=19, S=64)
    for backend in fast_backends(dtype):
        out = mmdl_losses(emb, index, label, modes, reduction="none", backend=backend)
        ref = mmdl_losses(emb.double(), index, label, modes.double(), reduction="none", backend="reference")
        assert out.triplet.dtype == torch.float32
        torch.testing.assert_close(out.triplet.double(), ref.triplet, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(out.ce.double(), ref.ce, atol=2e-4, rtol=2e-4)


def test_gradcheck_float64():
    emb, index, label, modes = case(B=2, D=3, H=3, W=4, C=3, M=2, S=9)
    index[1, :3] = torch.tensor([5, 5, 7])  # a repeated pixel: its gradients add up
    label[1, :3] = torch.tensor([0, 2, 1])
    for backend in ["reference"] + fast_backends():
        for reduction in ("none", "mean"):
            f = lambda e, r: tuple(mmdl_losses(e, index, label, r, reduction=reduction, backend=backend)[:2])
            assert torch.autograd.gradcheck(f, (emb.clone().requires_grad_(), modes.clone().requires_grad_()))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradients_match_reference(layout):
    emb, index, label, modes = case(seed=4, D=8, C=19, S=200, H=12, W=13, layout=layout)
    weights = torch.rand(2, *index.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = {}
    for backend in ["reference"] + fast_backends():
        e, r = emb.clone().requires_grad_(), modes.clone().requires_grad_()
        out = mmdl_losses(e, index, label, r, reduction="none", backend=backend)
        ((out.triplet * weights[0]).sum() + (out.ce * weights[1]).sum()).backward()
        grads[backend] = (e.grad, r.grad)
        assert e.grad.shape == emb.shape
    for backend, (ge, gr) in grads.items():
        torch.testing.assert_close(ge, grads["reference"][0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(gr, grads["reference"][1], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("used", ["triplet", "ce"])
def test_gradients_of_one_loss_alone(used, reduction):
    """The other loss's gradient never reaches the backward (no zeros are
    built for it by autograd): the op fills it in as zeros itself."""
    emb, index, label, modes = case(seed=6, D=8, C=5, S=40, H=6, W=7)
    grads = {}
    for backend in ["reference"] + fast_backends():
        e, r = emb.clone().requires_grad_(), modes.clone().requires_grad_()
        getattr(mmdl_losses(e, index, label, r, reduction=reduction, backend=backend), used).sum().backward()
        grads[backend] = (e.grad, r.grad)
    for ge, gr in grads.values():
        torch.testing.assert_close(ge, grads["reference"][0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(gr, grads["reference"][1], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fp32_values_and_gradients_match_float64_reference(layout):
    """fp32 backends (triton among them) with repeated pixels, whose row
    gradients add up, against the float64 reference."""
    emb, index, label, modes = case(seed=4, D=8, C=19, S=64, H=12, W=13, layout=layout)
    index[1, :4] = torch.tensor([5, 5, 7, 5])
    label[1, :4] = torch.tensor([0, 2, 1, 0])
    weights = torch.rand(2, *index.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    results = {}
    for backend, dtype in [("reference", torch.float64)] + [(b, torch.float32) for b in fast_backends(torch.float32)]:
        e, r = emb.detach().to(dtype).requires_grad_(), modes.detach().to(dtype).requires_grad_()
        out = mmdl_losses(e, index, label, r, reduction="none", backend=backend)
        ((out.triplet * weights[0]).sum() + (out.ce * weights[1]).sum()).backward()
        assert e.grad.shape == emb.shape and e.grad.dtype == dtype
        results[backend] = [t.detach().double() for t in (out.triplet, out.ce, e.grad, r.grad)]
    for backend, got in results.items():
        for value, want in zip(got, results["reference"]):
            torch.testing.assert_close(value, want, **FP32_TOLERANCE)


def test_empty_and_all_ignored_sets():
    emb, index, label, modes = case(dtype=torch.float32)
    for backend in ["reference"] + fast_backends(torch.float32):
        e = emb.clone().requires_grad_()
        out = mmdl_losses(e, torch.full_like(index, -1), label, modes, backend=backend)
        assert float(out.triplet) == 0 and float(out.ce) == 0 and int(out.count) == 0
        (out.triplet + out.ce).backward()
        assert (e.grad == 0).all()
        empty = mmdl_losses(emb, index[:, :0], label[:, :0], modes, backend=backend)
        assert float(empty.triplet) == 0 and int(empty.count) == 0


def test_single_class_has_no_triplet_term():
    emb, index, label, modes = case(dtype=torch.float32, C=1)
    label = label.clamp(max=0)
    for backend in ["reference"] + fast_backends(torch.float32):
        out = mmdl_losses(emb, index, label, modes, reduction="none", backend=backend)
        assert (out.triplet == 0).all() and torch.allclose(out.ce, torch.zeros_like(out.ce))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_ties_in_modes_and_nd_input(dtype):
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(20, 4, generator=g, dtype=dtype)  # (N, D): one image
    centre = torch.randn(4, generator=g, dtype=dtype)
    modes = torch.stack([torch.stack([centre, centre]), torch.stack([centre + 1, centre - 1])])
    index = torch.arange(20)[None]
    label = torch.randint(0, 2, (1, 20), generator=g)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}
    for backend in ["reference"] + fast_backends(dtype):
        assert (label_mode(emb, index, torch.zeros_like(label), modes, backend=backend) == 0).all()
        out = mmdl_losses(emb, index, label, modes, reduction="none", backend=backend)
        ref = mmdl_losses(emb, index, label, modes, reduction="none", backend="reference")
        torch.testing.assert_close(out.ce, ref.ce, **tolerance)


def test_label_mode_matches_reference():
    emb, index, label, modes = case(seed=6, C=5, M=4, S=80)
    expected = label_mode(emb, index, label, modes, backend="reference")
    assert expected.dtype == torch.uint8 and (expected[0, :3] == 255).all()
    for backend in fast_backends(torch.float32):
        if backend in fast_backends(torch.float64):
            assert torch.equal(label_mode(emb, index, label, modes, backend=backend), expected)
        assert torch.equal(label_mode(emb.float(), index, label, modes.float(), backend=backend), expected)
        half = label_mode(emb.half(), index, label, modes.float(), backend=backend)
        assert torch.equal(half, label_mode(emb.half().double(), index, label, modes.double(), backend="reference"))


def test_saves_nothing_of_size_samples_by_classes():
    emb, index, label, modes = case(dtype=torch.float32, C=19, S=300, D=8)
    e, r = emb.clone().requires_grad_(), modes.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = mmdl_losses(e, index, label, r, backend="cpu")
    assert max(saved) <= max(emb.numel(), index.numel())
    (out.triplet + out.ce).backward()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel slice of channels_last"])
@pytest.mark.parametrize("mean", [False, True])
def test_opcheck_cpu_operators(mean, layout):
    """The operators against their fake kernels (strides of every output
    included): a channel slice of a channels-last map is neither layout, and
    its gradient is contiguous on both sides."""
    emb, index, label, modes = case(dtype=torch.float32, S=10, D=5 if layout == "contiguous" else 9,
                                    layout="contiguous" if layout == "contiguous" else "channels_last")
    if layout.startswith("channel slice"):
        emb, modes = emb[:, :5], modes[..., :5]
    args = (emb.requires_grad_(), index, label, modes.requires_grad_(), SIGMA, ALPHA, SCALE, mean)
    torch.library.opcheck(torch.ops.drsl_fast.mmdl_losses.default, args)
    shape = () if mean else index.shape  # the backward also takes 0-d gradients, one for every sample
    grads = (torch.rand(shape), torch.rand(shape))
    torch.library.opcheck(torch.ops.drsl_fast.mmdl_losses_backward.default,
                          grads + (emb.detach(), index, label, modes.detach(), SIGMA, ALPHA, SCALE, True, True))
    torch.library.opcheck(torch.ops.drsl_fast.label_mode.default, (emb.detach(), index, label, modes.detach()))


@pytest.mark.parametrize("mean", [False, True])
def test_opcheck_triton_operators(mean):
    from drsl_fast.backends import why_unavailable

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if why_unavailable("triton", device) is not None:
        pytest.skip(why_unavailable("triton", device))
    emb, index, label, modes = (t.to(device) for t in case(dtype=torch.float32, S=10))
    test_utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    args = (emb.requires_grad_(), index, label, modes.requires_grad_(), SIGMA, ALPHA, SCALE, mean)
    torch.library.opcheck(torch.ops.drsl_fast.mmdl_losses_triton.default, args, test_utils=test_utils)
    shape = () if mean else index.shape  # the backward also takes 0-d gradients, one for every sample
    grads = (torch.rand(shape, device=device), torch.rand(shape, device=device))
    torch.library.opcheck(torch.ops.drsl_fast.mmdl_losses_backward_triton.default,
                          grads + (emb.detach(), index, label, modes.detach(), SIGMA, ALPHA, SCALE, True, True),
                          test_utils=test_utils)
    torch.library.opcheck(torch.ops.drsl_fast.label_mode_triton.default, (emb.detach(), index, label, modes.detach()),
                          test_utils=test_utils)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(index=torch.zeros(3, 4, dtype=torch.long)), ValueError, r"index must be \(B, S\) with B=2"),
        (dict(label=torch.zeros(2, 5, dtype=torch.long)), ValueError, "label must be shaped like index"),
        (dict(index=torch.zeros(2, 4)), TypeError, "index must be an integer tensor"),
        (dict(reduction="sum"), ValueError, "reduction must be one of"),
        (dict(sigma=0.0), ValueError, "sigma must be a finite number > 0"),
    ],
)
def test_input_validation(change, error, match):
    emb, index, label, modes = case(S=4)
    kwargs = dict(index=index, label=label, reduction="mean", sigma=SIGMA)
    kwargs.update(change)
    with pytest.raises(error, match=match):
        mmdl_losses(emb, kwargs["index"], kwargs["label"], modes, kwargs["sigma"], reduction=kwargs["reduction"])


def test_drsl_loss_combines_eq_8_9_10():
    g = torch.Generator().manual_seed(0)
    C, D = 4, 6
    emb_s = torch.randn(1, D, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    emb_t = torch.randn(1, D, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    modes = torch.randn(C, 3, D, generator=g, dtype=torch.float64, requires_grad=True)
    labels_s = torch.randint(0, C, (1, 16, 16), generator=g)  # full resolution: reduced by 2 inside
    labels_t = torch.randint(0, C, (1, 16, 16), generator=g)
    labels_t[:, :4] = 255
    seg_s, seg_t = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    loss = DRSLLoss(C, samples_per_class=5)

    source_only = loss(modes, emb_s, labels_s, seg_s, generator=torch.Generator().manual_seed(1))
    t = source_only.terms
    torch.testing.assert_close(source_only.total, seg_s + 0.25 * t["triplet_source"] + 0.1 * t["ce_source"])

    out = loss(modes, emb_s, labels_s, seg_s, emb_t, labels_t, seg_t, generator=torch.Generator().manual_seed(1))
    t = out.terms
    # the same seed draws the same source samples: Eq. 9/10 reuse Eq. 8's source terms
    torch.testing.assert_close(t["triplet_source"], source_only.terms["triplet_source"])
    expected = (seg_s + seg_t + 0.25 * (t["triplet_source"] + t["triplet_target"])
                + 0.1 * (t["ce_source"] + t["ce_target"]) + 0.1 * t["consistency"])
    torch.testing.assert_close(out.total, expected)
    torch.testing.assert_close(t["in_mode"], t["triplet_source"] + t["triplet_target"])
    out.total.backward()
    assert emb_s.grad.abs().sum() > 0 and emb_t.grad.abs().sum() > 0 and modes.grad.abs().sum() > 0


def test_in_mode_variance_averages_each_set_separately():
    emb, index, label, modes = case(seed=9, S=30)
    source = mmdl_losses(emb, index, label, modes)
    target = mmdl_losses(emb, index[:, :7], label[:, :7], modes)
    empty = mmdl_losses(emb, index[:, :0], label[:, :0], modes)
    torch.testing.assert_close(in_mode_variance(source, target), source.triplet + target.triplet)
    torch.testing.assert_close(in_mode_variance(source, empty), source.triplet)


def test_sampled_pairs_feed_the_losses():
    labels = torch.randint(0, 4, (2, 6, 7), generator=torch.Generator().manual_seed(0))
    labels[0, 0] = 255
    emb, _, _, modes = case()
    samples = sample_per_class(labels, 4, 5, torch.Generator().manual_seed(0))
    index, label = samples.pairs()
    assert index.shape == label.shape == (2, 20)
    out = mmdl_losses(emb, index, label, modes)
    assert int(out.count) == int(samples.count.sum())
    picked = labels.reshape(2, -1).gather(1, index.clamp(min=0))
    assert ((picked == label) | (index < 0)).all()


def test_triton_refuses_float64_clearly():
    from drsl_fast.backends import why_unavailable

    if why_unavailable("triton", torch.device("cpu")) is not None:
        pytest.skip(why_unavailable("triton", torch.device("cpu")))
    emb, index, label, modes = case(S=4)
    with pytest.raises(TypeError, match="triton backend computes in fp32"):
        mmdl_losses(emb, index, label, modes, backend="triton")
    with pytest.raises(TypeError, match="triton backend computes in fp32"):
        label_mode(emb, index, label, modes, backend="triton")


def test_gradients_are_deterministic_across_thread_counts():
    emb, index, label, modes = case(dtype=torch.float32, B=2, D=8, H=40, W=50, C=5, S=3000, seed=4)
    threads = torch.get_num_threads()
    grads = []
    for num_threads in (1, max(2, threads), 1):
        torch.set_num_threads(num_threads)
        e, r = emb.clone().requires_grad_(True), modes.clone().requires_grad_(True)
        out = mmdl_losses(e, index, label, r, backend="cpu")
        (out.triplet + out.ce).backward()
        grads.append((e.grad, r.grad))
    torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for other in grads[1:] for a, b in zip(grads[0], other))


def test_cpu_backend_over_many_runs_of_counted_samples():
    """The CPU kernels take the counted samples of an image kTile (64) at a
    time and the mode gradient in chunks of 1024 of them: here two images of
    2600 slots, a third of them not counting (interleaved), D = 37 (no whole
    number of vectors), repeated pixels. fp32 values, gradients and
    label_mode against the float64 reference; and a channels-last copy of
    the map gives the same bits (only the order of the reads differs)."""
    emb, index, label, modes = case(dtype=torch.float64, seed=12, B=2, D=37, H=40, W=40, C=19, M=3, S=2600)
    g = torch.Generator().manual_seed(13)
    skipped = torch.rand(index.shape, generator=g) < 0.33
    index[skipped & (torch.rand(index.shape, generator=g) < 0.5)] = -1
    label[skipped & (index >= 0)] = 255
    weights = torch.rand(2, *index.shape, dtype=torch.float64, generator=g)
    results = {}
    for name, backend, e0 in (("reference", "reference", emb), ("cpu", "cpu", emb.float()),
                              ("cpu, channels-last", "cpu", emb.float().contiguous(memory_format=torch.channels_last))):
        e, r = e0.clone().requires_grad_(), modes.to(e0.dtype).clone().requires_grad_()
        out = mmdl_losses(e, index, label, r, reduction="none", backend=backend)
        ((out.triplet * weights[0].to(e.dtype)).sum() + (out.ce * weights[1].to(e.dtype)).sum()).backward()
        results[name] = [out.triplet, out.ce, e.grad, r.grad, label_mode(e.detach(), index, label, r.detach(),
                                                                           backend=backend)]
    assert ((index >= 0) & (label < 19)).sum(1).min() > 1024  # two chunks of the mode gradient in each image
    for got, want in zip(results["cpu"][:4], results["reference"][:4]):
        torch.testing.assert_close(got.double(), want, **FP32_TOLERANCE)
    assert torch.equal(results["cpu"][4], results["reference"][4])
    for got, want in zip(results["cpu, channels-last"], results["cpu"]):
        assert torch.equal(got, want)


def test_gradients_are_deterministic(fast_backend):
    """Repeated runs give bitwise-equal gradients, repeated pixels included
    (triton: rows summed per pixel in sample order; every backend: mode
    gradients summed over fixed blocks of samples, in order)."""
    backend, device = fast_backend
    emb, index, label, modes = case(dtype=torch.float32, seed=7, D=8, C=6, S=64, H=5, W=6)  # many repeated pixels
    grads = []
    for _ in range(2):
        e = emb.to(device).requires_grad_()
        r = modes.to(device).requires_grad_()
        out = mmdl_losses(e, index.to(device), label.to(device), r, backend=backend)
        (out.triplet + out.ce).backward()
        grads.append((e.grad, r.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


# The CUDA kernels stage a block's samples in shared memory (csrc/cuda/mmdl_losses.cu, sample_tiling) unless
# one sample's row passes 48 KiB: in float64 at D = 6200 they read the embeddings in place (in float32 that
# takes D > 12270, where fp32 sums of squares are off the reference by more than the tolerance).
@pytest.mark.parametrize("D, C, S, dtype", [(8, 19, 200, torch.float32), (100, 19, 200, torch.float32),
                                            (6200, 3, 20, torch.float64)], ids=["D8", "D100", "D6200-float64"])
def test_every_fast_backend_on_its_device(fast_backend, D, C, S, dtype):
    """Values and gradients of the fast backend on its own device (the CUDA
    backend runs here where a GPU is present) against the float64 reference."""
    backend, device = fast_backend
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton computes in fp32 and refuses float64")
    emb, index, label, modes = case(dtype=dtype, seed=9, D=D, C=C, S=S, H=12, W=13)
    weights = torch.rand(2, *index.shape, generator=torch.Generator().manual_seed(0))
    results = {}
    for name, dev, as_dtype in ((backend, device, dtype), ("reference", torch.device("cpu"), torch.float64)):
        e = emb.detach().to(dev, as_dtype).requires_grad_()
        r = modes.detach().to(dev, as_dtype).requires_grad_()
        out = mmdl_losses(e, index.to(dev), label.to(dev), r, reduction="none", backend=name)
        ((out.triplet * weights[0].to(dev)).sum() + (out.ce * weights[1].to(dev)).sum()).backward()
        modes_of = label_mode(e.detach(), index.to(dev), label.to(dev), r.detach(), backend=name)
        results[name] = [t.detach().cpu().double() for t in (out.triplet, out.ce, e.grad, r.grad)] + [modes_of.cpu()]
    fast, ref = results[backend], results["reference"]
    for got, want in zip(fast[:4], ref[:4]):
        torch.testing.assert_close(got, want, **FP32_TOLERANCE)
    assert torch.equal(fast[4], ref[4])


def test_means_and_count_come_from_the_operator(fast_backend):
    """reduction='mean' is one operator call: its means, count and gradients
    against the float64 reference's sums and divisions, on the backend's own
    device; then a set where no sample counts (means 0, zero gradients)."""
    backend, device = fast_backend
    dtype = torch.float32 if backend == "triton" else torch.float64
    emb, index, label, modes = case(dtype=dtype, seed=11, D=8, C=7, S=90, H=9, W=10)
    index[1, :4] = torch.tensor([5, 5, 7, 5])  # repeated pixels
    tolerance = FP32_TOLERANCE if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)

    def run(name, dev, as_dtype, samples):
        e, r = (t.detach().to(dev, as_dtype).requires_grad_() for t in (emb, modes))
        out = mmdl_losses(e, samples.to(dev), label.to(dev), r, backend=name)
        assert out.triplet.shape == out.ce.shape == out.count.shape == ()
        assert out.count.dtype == torch.int64 and not out.count.requires_grad
        (0.3 * out.triplet + 0.7 * out.ce).backward()
        return int(out.count), [t.detach().cpu().double() for t in (out.triplet, out.ce, e.grad, r.grad)]

    for samples in (index, torch.full_like(index, -1)):
        count, got = run(backend, device, dtype, samples)
        want_count, want = run("reference", torch.device("cpu"), torch.float64, samples)
        assert count == want_count
        for value, expected in zip(got, want):
            torch.testing.assert_close(value, expected, **tolerance)
    assert count == 0 and all((t == 0).all() for t in got)  # the last set: no sample counts


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction, used", [("mean", "both"), ("none", "both"), ("none", "triplet")])
def test_embedding_gradient_layouts_dtypes_and_repeats(fast_backend, layout, dtype, reduction, used):
    """The embedding gradient of the fast backend against the float64
    reference's on the same (rounded) inputs: embeddings contiguous,
    channels-last or (N, D) rows; low-precision storage; pixels repeated within
    an image (their rows add up) and across images (they do not); a mean's
    gradient (one value for every sample), per-sample ones, and per-sample ones
    with the other loss unused (its gradient a single zero)."""
    backend, device = fast_backend
    if backend == "triton" and dtype != torch.float32:
        pytest.skip("triton's low-precision inputs: test_low_precision_inputs_accumulate_in_fp32")
    emb, index, label, modes = case(dtype=dtype, seed=13, B=2, D=6, H=5, W=4, C=5, S=30,
                                    layout="channels_last" if layout == "channels_last" else "contiguous")
    index[0, :5] = torch.tensor([3, 3, 9, 3, 9])
    index[1, :2] = torch.tensor([3, 3])
    label[0, :5] = torch.tensor([0, 1, 2, 4, 3])
    if layout == "rows":  # one image of (N, D) rows
        emb, index, label = emb[0].flatten(1).t().contiguous(), index[:1], label[:1]
    weights = torch.rand(2, *index.shape, generator=torch.Generator().manual_seed(1))
    grads = {}
    for name, dev, as_dtype in ((backend, device, dtype), ("reference", torch.device("cpu"), torch.float64)):
        e = emb.detach().to(dev, as_dtype).requires_grad_()
        r = modes.detach().to(dev, as_dtype)
        out = mmdl_losses(e, index.to(dev), label.to(dev), r, reduction=reduction, backend=name)
        if reduction == "mean":
            total = 0.3 * out.triplet + 0.7 * out.ce
        elif used == "both":
            total = (out.triplet * weights[0].to(dev)).sum() + (out.ce * weights[1].to(dev)).sum()
        else:
            total = (out.triplet * weights[0].to(dev)).sum()
        total.backward()
        assert e.grad.dtype == as_dtype and e.grad.shape == e.shape and e.grad.stride() == e.stride()
        grads[name] = e.grad.cpu().double()
    tolerance = FP32_TOLERANCE if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(grads[backend], grads["reference"], **tolerance)
    assert (grads[backend][grads["reference"] == 0] == 0).all()  # pixels no sample counts at


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64], ids=str)
def test_labels_at_is_nearest_interpolation(dtype):
    """labels_at gives F.interpolate(mode="nearest")'s labels at every size:
    as a strided view where the sizes divide (ratios 1, 2, 3, 4, unequal per
    axis), through the interpolation where they do not."""
    import torch.nn.functional as F

    from drsl_fast.losses import labels_at

    labels = torch.randint(0, 256, (2, 24, 36), generator=torch.Generator().manual_seed(0)).to(dtype)
    for h, w in ((24, 36), (12, 18), (8, 12), (6, 9), (12, 9), (24, 12), (7, 10), (13, 36), (48, 72)):
        emb = torch.empty(2, 3, h, w)
        got = labels_at(labels, emb)
        want = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].to(dtype)
        assert got.dtype == dtype and torch.equal(got, want)
        if 24 % h == 0 and 36 % w == 0:
            assert got.data_ptr() == labels.data_ptr()  # a view


def test_weighted_sum_as_one_product_and_as_a_chain():
    """weighted_sum's dot of the stacked terms gives the chain of adds' total
    and gradients (float64 and fp32, the latter also under autocast, where it
    stays fp32); a term given as a number, or terms of two dtypes, take the
    chain."""
    from drsl_fast.losses.drsl_loss import weighted_sum

    weights = (1.0, 1.0, 0.25, 0.25, 0.1, 0.1, 0.1)
    for dtype in (torch.float64, torch.float32):
        values = torch.rand(7, generator=torch.Generator().manual_seed(3), dtype=dtype)
        terms = [v.clone().requires_grad_() for v in values]
        total = weighted_sum(list(zip(terms, weights)))
        assert total.grad_fn.name() == "DotBackward0" and total.dtype == dtype
        total.backward()
        expected = sum(float(v) * w for v, w in zip(values, weights))
        torch.testing.assert_close(total.item(), expected)
        assert [t.grad.item() for t in terms] == [torch.tensor(w, dtype=dtype).item() for w in weights]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert weighted_sum([(t.detach().float(), w) for t, w in zip(terms, weights)]).dtype == torch.float32
    mixed = [(0.5, 1.0), (torch.tensor(2.0, dtype=torch.float64), 0.25)]
    assert weighted_sum(mixed).item() == 1.0 and weighted_sum(mixed).grad_fn is None
    two_dtypes = [(torch.tensor(1.0, requires_grad=True), 1.0), (torch.tensor(2.0, dtype=torch.float64), 0.5)]
    assert weighted_sum(two_dtypes).grad_fn.name() == "AddBackward0"
