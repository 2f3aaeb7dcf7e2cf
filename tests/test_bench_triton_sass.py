"""bench/triton_sass.py: loops found in SASS, and a compile of the Triton
mode-distance kernels for sm_90 on this machine (no GPU needed)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import triton_sass  # noqa: E402

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
.L_x_1:
        /*0020*/                   FFMA R3, R2, R2, R3 ;
        /*0030*/              @P0 BRA `(.L_x_1) ;
        /*0040*/                   FADD R3, R3, R2 ;
        /*0050*/              @!P1 BRA `(.L_x_0) ;
        /*0060*/                   EXIT ;
.L_x_2:
        /*0070*/                   BRA `(.L_x_2);
"""


def test_loops_are_branches_back_and_the_trap_is_not_one():
    assert triton_sass.loops(SASS) == [
        ("L_x_1", 2, {"FFMA": 1, "BRA": 1}),
        ("L_x_0", 5, {"BRA": 2, "LDG": 1, "FFMA": 1, "FADD": 1}),
    ]


def test_the_mode_distance_kernels_compile_and_are_described():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "triton_sass.py"), "--classes", "5"],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for kernel in ("_forward_kernel", "_grad_emb_kernel", "_grad_modes_kernel"):
        assert f"**{kernel}**: " in proc.stdout
    assert "registers, 0 bytes of stack" in proc.stdout and "- loop L_x_" in proc.stdout
