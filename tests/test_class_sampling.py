"""sample_per_class (docs/method.md §4, §10) on every backend: exact counts, no
duplicates, right classes, -1 padding, reproducibility, and statistical
uniformity (chi-square) against the plain-loop reference; the CUDA kernels
(emulated on the CPU, tests/cuda_on_cpu) give the CPU backend's samples."""
import math

import pytest
import torch

from conftest import emulating
from drsl_fast.losses import sample_per_class

BACKENDS = ["reference", "cpu", "triton", "cuda-emulated"]


def available(backend):
    from drsl_fast.backends import why_unavailable

    reason = why_unavailable(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """A backend on CPU tensors; "cuda-emulated" runs the CUDA launcher's
    kernels on the CPU as backend "cpu"."""
    if request.param == "cuda-emulated":
        with emulating(request, request.param):
            yield "cpu"
        return
    available(request.param)
    yield request.param


def check_sample(labels, num_classes, k, samples):
    B = labels.shape[0]
    flat = labels.reshape(B, -1).long()
    assert samples.index.shape == (B, num_classes, k) and samples.index.dtype == torch.int64
    assert samples.count.shape == (B, num_classes) and samples.count.dtype == torch.int64
    for b in range(B):
        for c in range(num_classes):
            n = int((flat[b] == c).sum())
            row = samples.index[b, c]
            taken = min(n, k)
            assert int(samples.count[b, c]) == taken
            assert (row[taken:] == -1).all()
            chosen = row[:taken]
            assert chosen.unique().numel() == taken, "duplicates"
            assert (flat[b, chosen] == c).all()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64], ids=str)
def test_counts_classes_padding(backend, dtype):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (3, 11, 7), generator=g)
    labels[0, :4] = 255  # ignored
    labels[1] = torch.where(labels[1] == 2, 255, labels[1])  # class 2 empty in image 1
    labels[2] = 255  # all-ignore image
    labels = labels.to(dtype)
    if dtype != torch.uint8:
        labels[0, 5, 0] = -1  # out of range below
    for k in (0, 3, 40):
        samples = sample_per_class(labels, 7, k, torch.Generator().manual_seed(1), backend=backend)
        check_sample(labels, 7, k, samples)
    assert (samples.count[2] == 0).all() and (samples.count[:, 6] == 0).all()  # class 6 never present


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_reproducible_and_seed_dependent(backend):
    available(backend)
    labels = torch.randint(0, 4, (2, 16, 16), generator=torch.Generator().manual_seed(3))
    draw = lambda seed: sample_per_class(labels, 4, 10, torch.Generator().manual_seed(seed), backend=backend).index
    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


def chi_square_uniform(hits, expected):
    """Pearson statistic and its normal-approximation z score."""
    stat = float(((hits - expected) ** 2 / expected).sum())
    dof = hits.numel() - 1
    return (stat - dof) / math.sqrt(2 * dof)


def test_uniform_inclusion_and_order(backend):
    """Each of the n pixels of a class is chosen with probability k/n, and
    every output slot holds each pixel with probability 1/n (random order)."""
    labels = torch.full((1, 6, 5), 255, dtype=torch.int64)
    labels.view(-1)[::2] = 1  # 15 pixels of class 1 on a regular pattern
    pixels = (labels.view(-1) == 1).nonzero().squeeze(1)
    n, k, draws = pixels.numel(), 4, 3000
    g = torch.Generator().manual_seed(11)
    inclusion = torch.zeros(30)
    first_slot = torch.zeros(30)
    for _ in range(draws):
        row = sample_per_class(labels, 2, k, g, backend=backend).index[0, 1]
        inclusion[row] += 1
        first_slot[row[0]] += 1
    assert abs(chi_square_uniform(inclusion[pixels], draws * k / n)) < 5
    assert abs(chi_square_uniform(first_slot[pixels], draws / n)) < 5


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_pairs_are_uniform_like_the_reference(backend):
    """Joint law of the 2-subsets of 6 pixels: all 15 equally likely."""
    available(backend)
    labels = torch.zeros(1, 2, 3, dtype=torch.int64)
    g = torch.Generator().manual_seed(2)
    hits = torch.zeros(6, 6)
    for _ in range(3000):
        a, b = sample_per_class(labels, 1, 2, g, backend=backend).index[0, 0].sort().values
        hits[a, b] += 1
    pairs = hits[torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)]
    assert abs(chi_square_uniform(pairs, 3000 / 15)) < 5


@pytest.mark.parametrize("kernels", ["cuda-emulated", "cuda"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64], ids=str)
def test_cuda_gives_the_cpu_samples(request, kernels, dtype):
    """For the same keys the CUDA backend (emulated on the CPU, or on a GPU
    where one is present) and the CPU kernel select the same pixels in the
    same order: tied keys go to the lower pixel, labels strided (a nearest
    reduction by 2 as a view), ignored and out-of-range ids, an all-ignore
    image, k above and below the class sizes."""
    from drsl_fast import _extension
    from drsl_fast.backends import why_unavailable

    if not _extension.has_cpu_kernels():
        pytest.skip(_extension.LOAD_ERROR)
    if kernels == "cuda" and why_unavailable("cuda", torch.device("cuda")) is not None:
        pytest.skip(f"cuda: {why_unavailable('cuda', torch.device('cuda'))}")
    g = torch.Generator().manual_seed(4)
    cases = [(3, 11, 7, 7, 3), (2, 16, 16, 4, 40), (1, 5, 9, 3, 100), (2, 30, 41, 19, 30)]
    expected = []
    for B, H, W, C, k in cases:
        low = 0 if dtype == torch.uint8 else -1
        labels = torch.randint(low, C + 1, (B, 2 * H, 2 * W), generator=g).to(dtype)[:, ::2, ::2]
        labels[0, :2] = 255
        if B > 1:
            labels[1] = 255
        keys = torch.randint(0, 1 << 48, (B, H * W), generator=g)
        keys[:, ::3] = keys[:, :1]  # ties
        cpu = torch.ops.drsl_fast.sample_per_class(labels.contiguous(), keys, C, k)
        expected.append((labels, keys, C, k, cpu))
    if kernels == "cuda":
        for labels, keys, C, k, (index, count) in expected:
            strided = labels._base.cuda()[:, ::2, ::2]  # the view on the GPU, not a contiguous copy
            got_index, got_count = torch.ops.drsl_fast.sample_per_class(strided, keys.cuda(), C, k)
            assert torch.equal(got_index.cpu(), index) and torch.equal(got_count.cpu(), count)
        return
    with emulating(request, kernels):
        for labels, keys, C, k, (index, count) in expected:
            got_index, got_count = torch.ops.drsl_fast.sample_per_class(labels, keys, C, k)
            assert torch.equal(got_index, index) and torch.equal(got_count, count)


def test_large_map_no_host_sync_shape():
    labels = torch.randint(0, 19, (2, 64, 96), generator=torch.Generator().manual_seed(0))
    labels[:, :10] = 255
    samples = sample_per_class(labels, 19, 300, torch.Generator().manual_seed(0), backend="cpu")
    check_sample(labels, 19, 300, samples)


@pytest.mark.parametrize(
    "labels, num_classes, k, error, match",
    [
        (torch.zeros(2, 3, dtype=torch.long), 4, 3, ValueError, r"\(B, H, W\)"),
        (torch.zeros(1, 2, 3), 4, 3, TypeError, "integer"),
        (torch.zeros(1, 2, 3, dtype=torch.long), 0, 3, ValueError, "num_classes"),
        (torch.zeros(1, 2, 3, dtype=torch.long), 4, -1, ValueError, "k must be"),
    ],
)
def test_input_validation(labels, num_classes, k, error, match):
    with pytest.raises(error, match=match):
        sample_per_class(labels, num_classes, k)


def test_opcheck_cpu_operator():
    from drsl_fast import _extension

    if not _extension.has_cpu_kernels():
        pytest.skip(_extension.LOAD_ERROR)
    labels = torch.randint(0, 3, (2, 4, 5), generator=torch.Generator().manual_seed(0))
    keys = torch.randint(0, 1 << 48, (2, 20), generator=torch.Generator().manual_seed(1))
    torch.library.opcheck(torch.ops.drsl_fast.sample_per_class.default, (labels, keys, 4, 3))


def test_every_fast_backend_on_its_device(fast_backend):
    """Counts, classes, padding and first-slot uniformity on the backend's own
    device (the CUDA backend runs here where a GPU is present)."""
    backend, device = fast_backend
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (3, 11, 7), generator=g)
    labels[0, :4] = 255
    labels[2] = 255
    gen = torch.Generator(device=device).manual_seed(1)
    for k in (0, 3, 40):
        samples = sample_per_class(labels.to(device), 7, k, gen, backend=backend)
        check_sample(labels, 7, k, type(samples)(samples.index.cpu(), samples.count.cpu()))
    pattern = torch.full((1, 6, 5), 255, dtype=torch.int64)
    pattern.view(-1)[::2] = 1
    pixels = (pattern.view(-1) == 1).nonzero().squeeze(1)
    first_slot = torch.zeros(30)
    draws = 1500
    for _ in range(draws):
        first_slot[sample_per_class(pattern.to(device), 2, 4, gen, backend=backend).index[0, 1, 0].cpu()] += 1
    assert abs(chi_square_uniform(first_slot[pixels], draws / pixels.numel())) < 5


def test_repeated_rows_are_the_labels_of_pairs():
    """DRSLLoss takes its sample labels from repeated_rows: the labels of
    pairs(), contiguous, built once per shape and device."""
    from drsl_fast.ops.class_sampling import repeated_rows

    labels = torch.randint(0, 4, (2, 6, 7), generator=torch.Generator().manual_seed(0))
    _, label = sample_per_class(labels, 4, 5, torch.Generator().manual_seed(0), backend="reference").pairs()
    rows = repeated_rows(2, 20, 5, torch.device("cpu"))
    assert torch.equal(rows, label) and rows.is_contiguous()
    assert repeated_rows(2, 20, 5, torch.device("cpu")) is rows
    assert torch.equal(repeated_rows(3, 7, 1, torch.device("cpu")), torch.arange(7).expand(3, 7))
