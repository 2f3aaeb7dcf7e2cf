"""Registers, spills, shared memory and the instruction mix of each loop of the
Triton mode-distance kernels, compiled for a GPU on a machine without one.

The launchers run on CPU tensors of the shape given, with the compile-instead-
of-launch of tests/test_triton_compile.py (kernels specialised as a real launch
specialises them); the SASS comes from the Triton wheel's ``nvdisasm``. A loop
is a backward branch; its instructions are counted once (one iteration). This
is how the kernels are read before a GPU times them (bench/NOTES.md).

    python bench/triton_sass.py                       # sm_90, B=2, D=64, C=19, M=3, 64x64
    python bench/triton_sass.py --arch 80 --classes 40
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nvidia_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def loops(sass: str):
    """(label, instructions, {opcode: count}) of each loop, in the order of
    their branches back (an inner loop before the one around it, whose span
    includes it); a branch to itself (the end's trap) is not a loop."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*\.(L_x_\d+):", line))}
    code = {i: m.group(1) for i, line in enumerate(lines) if (m := re.match(r"\s*/\*[0-9a-f]+\*/\s*(.*)", line))}
    found = []
    for i, text in code.items():
        m = re.search(r"BRA `\(\.(L_x_\d+)\)", text)
        if m and labels.get(m.group(1), i) < i:
            body = [code[j] for j in range(labels[m.group(1)], i + 1) if j in code]
            if len(body) == 1:
                continue
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
            found.append((m.group(1), len(body), dict(ops.most_common(6))))
    return found


def describe(name: str, kernel) -> str:
    with tempfile.TemporaryDirectory() as work:
        cubin = os.path.join(work, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([nvidia_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([nvidia_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED):(\d+)", usage))
    lines = [f"**{name}**: {fields.get('REG')} registers, {fields.get('STACK')} bytes of stack (spills), "
             f"{kernel.metadata.shared} bytes of shared memory, {kernel.metadata.num_warps} warps", ""]
    lines += [f"- loop {label}: {count} instructions from its label to its branch back (inner loops "
              f"included), {ops}" for label, count, ops in loops(sass)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--modes", type=int, default=3)
    parser.add_argument("--channels", type=int, default=64)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter's kernels do not compile")
    import torch
    from triton.backends.compiler import GPUTarget

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_triton_compile import WARP_SIZE, CompileInsteadOfLaunch

    from drsl_fast.triton_kernels import mode_distance

    C, M, D, B, H, W = args.classes, args.modes, args.channels, 2, 64, 64
    emb, modes = torch.randn(B, D, H, W), torch.randn(C, M, D)
    per_class = (B, C, H, W)
    launch = CompileInsteadOfLaunch(GPUTarget("cuda", args.arch, WARP_SIZE))
    mode_distance.forward(emb, modes, torch.empty(per_class), torch.empty(per_class, dtype=torch.uint8),
                          torch.empty(per_class), -2.0, launch=launch)
    chunks = mode_distance.mode_grad_chunks(H * W)
    mode_distance.backward(torch.randn(per_class), torch.zeros(per_class, dtype=torch.uint8), emb, modes,
                           torch.empty_like(emb), torch.empty(B * chunks, C, M, D), launch=launch)
    print(f"# Triton mode-distance kernels for sm_{args.arch}, C={C}, M={M}, D={D}\n")
    print("\n\n".join(describe(name, kernel) for name, kernel in zip(launch.kernels, launch.compiled)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
