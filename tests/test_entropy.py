"""The fused entropy map (docs/method.md §7) against ADVENT's separate-ops formula in
float64, on every backend, with gradients; and IntraDA's easy/hard ranking."""
import math

import pytest
import torch

import drsl_fast
from drsl_fast.ranking import RARE_CLASSES, rank_easy_hard, rare_classes_present

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def advent_formula(logits):
    """ADVENT's prob_2_entropy on softmax probabilities, float64, written
    independently of drsl_fast.reference."""
    x = logits.double()
    p = torch.exp(x - torch.logsumexp(x, 1, keepdim=True))
    C = x.shape[1]
    m = -p * torch.log2(p + 1e-30) / math.log2(C)
    return m, m.sum(1), m.mean(dim=(1, 2, 3))


def make_logits(shape, dtype=torch.float32, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def skip_unsupported(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend computes in fp32")


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_float64_equals_advent_formula(backend_name):
    logits = make_logits((2, 19, 5, 7), torch.float64)
    out = drsl_fast.ops.entropy_map(logits, backend=backend_name)
    for got, expected in zip(out, advent_formula(logits)):
        torch.testing.assert_close(got, expected, atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "odd_strided"])
def test_forward_matches_advent(fast_backend, dtype, layout):
    backend, device = fast_backend
    skip_unsupported(backend, dtype)
    logits = make_logits((2, 19, 6, 9), dtype, seed=1)
    if layout == "channels_last":
        logits = logits.contiguous(memory_format=torch.channels_last)
    elif layout == "odd_strided":
        logits = make_logits((1, 5, 9, 13), dtype, seed=2)[:, :, ::2, 1:]
    out = drsl_fast.ops.entropy_map(logits.to(device), backend=backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.map.dtype == acc and out.map.shape == logits.shape and out.map.is_contiguous()
    assert out.pixel_entropy.shape == (logits.shape[0],) + tuple(logits.shape[2:])
    assert out.image_score.shape == (logits.shape[0],)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for got, expected in zip(out, advent_formula(logits)):
        torch.testing.assert_close(got.cpu().double(), expected, atol=tol, rtol=tol)


def test_without_map_and_extreme_logits(fast_backend):
    backend, device = fast_backend
    logits = make_logits((1, 4, 3, 5), seed=3)
    logits[0, :, 0, 0] = torch.tensor([1000.0, -1000.0, 0.0, 0.0])  # p = (1, 0, 0, 0): entropy 0
    logits[0, :, 0, 1] = 7.0  # uniform: entropy 1
    out = drsl_fast.ops.entropy_map(logits.to(device), with_map=False, backend=backend)
    assert out.map is None
    expected = advent_formula(logits)
    torch.testing.assert_close(out.pixel_entropy.cpu().double(), expected[1], atol=2e-6, rtol=2e-6)
    assert abs(float(out.pixel_entropy[0, 0, 0])) < 1e-6 and abs(float(out.pixel_entropy[0, 0, 1]) - 1) < 1e-6


def upstream_loss(out, seed=5):
    g = torch.Generator().manual_seed(seed)
    w_map = torch.randn(out.map.shape, generator=g).to(out.map)
    w_pixel = torch.randn(out.pixel_entropy.shape, generator=g).to(out.map)
    return (out.map * w_map).sum() + (out.pixel_entropy * w_pixel).sum() + 3.0 * out.image_score.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_backward_matches_advent(fast_backend, dtype):
    backend, device = fast_backend
    skip_unsupported(backend, dtype)
    logits = make_logits((2, 7, 5, 6), dtype, seed=4).contiguous(memory_format=torch.channels_last)
    x = logits.clone().to(device).requires_grad_(True)
    upstream_loss(drsl_fast.ops.entropy_map(x, backend=backend)).backward()
    x64 = logits.detach().double().requires_grad_(True)
    m, pixel, score = advent_formula(x64)
    upstream_loss(drsl_fast.ops.EntropyMaps(m, pixel, score)).backward()
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(x.grad.cpu().double(), x64.grad, atol=tol, rtol=tol)


def test_entropy_loss_gradient_alone(fast_backend):
    """The ADVENT entropy loss: sum over C, mean over pixels; map unused."""
    backend, device = fast_backend
    logits = make_logits((1, 19, 4, 4), seed=6)
    x = logits.clone().to(device).requires_grad_(True)
    drsl_fast.ops.entropy_map(x, with_map=False, backend=backend).pixel_entropy.mean().backward()
    x64 = logits.detach().double().requires_grad_(True)
    advent_formula(x64)[1].mean().backward()
    torch.testing.assert_close(x.grad.cpu().double(), x64.grad, atol=1e-6, rtol=1e-5)


def test_gradcheck_float64():
    logits = make_logits((2, 3, 1, 3), torch.float64, seed=7, scale=1.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: tuple(drsl_fast.ops.entropy_map(x, backend="cpu")), (logits,))
    assert torch.autograd.gradcheck(
        lambda x: tuple(drsl_fast.ops.entropy_map(x, with_map=False, backend="cpu")[1:]), (logits,))


def test_opcheck_cpu_operators():
    from drsl_fast import _extension

    if not _extension.has_cpu_kernels():
        pytest.skip(f"extension missing: {_extension.LOAD_ERROR}")
    logits = make_logits((2, 4, 3, 5), seed=8).requires_grad_(True)
    for with_map in (True, False):
        torch.library.opcheck(torch.ops.drsl_fast.entropy_map.default, (logits, with_map))
    x = logits.detach()
    torch.library.opcheck(torch.ops.drsl_fast.entropy_map_backward.default,
                          (x, torch.randn_like(x), torch.randn(2, 3, 5)))
    torch.library.opcheck(torch.ops.drsl_fast.entropy_map_backward.default,
                          (x, torch.empty(0), torch.randn(2, 3, 5)))


def test_opcheck_triton_operator():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if drsl_fast.backends.why_unavailable("triton", device) is not None:
        pytest.skip(drsl_fast.backends.why_unavailable("triton", device))
    logits = make_logits((1, 3, 2, 5), seed=9).to(device).requires_grad_(True)
    torch.library.opcheck(torch.ops.drsl_fast.entropy_map_triton.default, (logits, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_saves_only_the_logits(fast_backend):
    backend, device = fast_backend
    logits = make_logits((2, 19, 6, 6)).to(device).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = drsl_fast.ops.entropy_map(logits, backend=backend)
    assert saved == [logits.numel()]
    out.image_score.sum().backward()


@pytest.mark.parametrize(
    "logits, error, match",
    [
        (torch.zeros(2, 3, 4), ValueError, r"\(B, C, H, W\)"),
        (torch.zeros(1, 1, 2, 2), ValueError, "C >= 2"),
        (torch.zeros(1, 3, 2, 2, dtype=torch.int32), TypeError, "float16"),
    ],
)
def test_input_validation(logits, error, match):
    with pytest.raises(error, match=match):
        drsl_fast.ops.entropy_map(logits)


# ---------------------------------------------------------------- ranking


def test_rank_easy_hard_plain_and_normalised():
    scores = torch.tensor([0.30, 0.10, 0.20, 0.40, 0.05, 0.25])
    split = rank_easy_hard(scores, lam=0.67)
    assert split.easy.tolist() == [4, 1, 2, 5] and split.hard.tolist() == [0, 3]  # floor(0.67 * 6) = 4
    rare = torch.tensor([0, 11, 0, 0, 0, 2])
    split = rank_easy_hard(scores, lam=0.5, rare_counts=rare)
    factors = [(11 - n) / 11 + 0.5 for n in rare.tolist()]
    expected = [s * f for s, f in zip(scores.tolist(), factors)]
    torch.testing.assert_close(split.scores, torch.tensor(expected))
    order = sorted(range(6), key=lambda i: expected[i])
    assert split.easy.tolist() == order[:3] and split.hard.tolist() == order[3:]


def test_rank_ties_are_stable_and_edges():
    split = rank_easy_hard(torch.tensor([0.5, 0.5, 0.5]), lam=0.67)
    assert split.easy.tolist() == [0, 1] and split.hard.tolist() == [2]
    assert rank_easy_hard(torch.tensor([1.0, 2.0]), lam=0.0).easy.numel() == 0
    with pytest.raises(ValueError, match="lam"):
        rank_easy_hard(torch.tensor([1.0]), lam=1.5)


def test_rare_classes_present():
    labels = torch.zeros(3, 4, 4, dtype=torch.long)
    labels[1, 0, :3] = torch.tensor([3, 9, 9])  # two rare classes
    labels[2] = torch.arange(16).view(4, 4) % 19  # 0..15: rare 3, 4, 5, 6, 7, 9, 12, 14, 15
    labels[2, 3, 3] = 255
    assert rare_classes_present(labels).tolist() == [0, 2, 8]
    scores = torch.nn.functional.one_hot(labels.clamp(max=18), 19).permute(0, 3, 1, 2).float()
    assert rare_classes_present(scores).tolist() == [0, 2, 8]
    assert len(RARE_CLASSES) == 11
