"""The text edits that other tools apply to copies of csrc/cuda/ still find
their text: each variant of bench/probe_tensor_core_kernels.py (timed on a
lent GPU) and each mutation of tests/cuda_on_cpu/mutations.py occurs exactly
once in its file. A kernel change that moves one of them fails here, on any
machine, instead of stopping the probe on a GPU whose time is scarce."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "cuda_on_cpu"))

import mutations  # noqa: E402
import probe_tensor_core_kernels as probe  # noqa: E402


@pytest.mark.parametrize("variant", [name for name in probe.VARIANTS if probe.VARIANTS[name]])
def test_probe_variant_applies(variant):
    source = probe.SOURCE.read_text()
    for old, _ in probe.VARIANTS[variant]:
        assert source.count(old) == 1, f"{variant}: {old[:80]!r} occurs {source.count(old)} times"


@pytest.mark.parametrize("mutation", list(mutations.MUTATIONS))
def test_mutation_applies(mutation):
    old, _ = mutations.MUTATIONS[mutation]
    counts = {name: (mutations.CUDA_DIR / name).read_text().count(old) for name in mutations.FILES}
    assert sum(counts.values()) == 1 and max(counts.values()) == 1, f"{mutation}: {counts}"
