"""bench/keops_cuda.py (pykeops on a GPU given the NVRTC of torch's wheels,
and a clear error where KeOps has no GPU support) and bench/harness.py's
report of a worker that dies in native code."""
import os
import sys
import textwrap
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import harness  # noqa: E402
import keops_cuda  # noqa: E402


def fake_wheel(root, headers=("cuda.h", "nvrtc.h")):
    """nvidia/cu13 as torch's CUDA 13 wheels lay it out (empty files)."""
    folder = os.path.join(root, "nvidia", "cu13")
    os.makedirs(os.path.join(folder, "include"))
    os.makedirs(os.path.join(folder, "lib"))
    for name in headers:
        open(os.path.join(folder, "include", name), "w").close()
    for name in ("libnvrtc.so.13", "libnvrtc-builtins.so.13.0", "libnvrtc.alt.so.13", "libcudart.so.13"):
        open(os.path.join(folder, "lib", name), "w").close()
    return os.path.join(root, "nvidia"), folder


def test_a_machine_without_nvrtc_gets_the_wheels_nvrtc_headers_and_link_names(tmp_path):
    nvidia, wheel = fake_wheel(str(tmp_path))
    links = str(tmp_path / "links")
    base = {"LD_LIBRARY_PATH": "/opt/x", "HOME": "/home/u"}
    env = keops_cuda.environment(base, found=lambda name: None, roots=[nvidia], links=links)
    lib = os.path.join(wheel, "lib")
    assert env["CUDA_PATH"] == wheel
    assert env["LD_LIBRARY_PATH"] == os.pathsep.join([links, lib, "/opt/x"])
    assert env["LIBRARY_PATH"] == os.pathsep.join([links, lib])
    assert env["HOME"] == "/home/u" and base == {"LD_LIBRARY_PATH": "/opt/x", "HOME": "/home/u"}
    assert {name: os.readlink(os.path.join(links, name)) for name in os.listdir(links)} == {
        "libnvrtc.so": os.path.join(lib, "libnvrtc.so.13"), "libnvrtc.so.13": os.path.join(lib, "libnvrtc.so.13"),
        "libcudart.so": os.path.join(lib, "libcudart.so.13"),
        "libcudart.so.13": os.path.join(lib, "libcudart.so.13")}
    again = keops_cuda.environment(base, found=lambda name: None, roots=[nvidia], links=links)
    assert again == env  # the links are replaced, not a failure the second time


def test_a_machine_with_nvrtc_or_without_a_usable_wheel_keeps_its_environment(tmp_path):
    nvidia, _ = fake_wheel(str(tmp_path / "a"))
    base = {"PATH": "/bin"}
    assert keops_cuda.environment(base, found=lambda name: f"lib{name}.so.12", roots=[nvidia]) == base
    headless, _ = fake_wheel(str(tmp_path / "b"), headers=("cuda.h",))
    assert keops_cuda.environment(base, found=lambda name: None, roots=[headless]) == base
    assert keops_cuda.wheel_cuda([str(tmp_path / "nowhere")]) is None


def test_the_driver_is_linked_where_the_loader_finds_it(tmp_path, monkeypatch):
    nvidia, _ = fake_wheel(str(tmp_path))
    monkeypatch.setattr(keops_cuda, "loaded_path", lambda soname: "/usr/lib/libcuda.so.580.1")
    links = str(tmp_path / "links")
    keops_cuda.environment({}, found=lambda name: "libcuda.so.1" if name == "cuda" else None, roots=[nvidia],
                           links=links)
    assert os.readlink(os.path.join(links, "libcuda.so")) == "/usr/lib/libcuda.so.580.1"


def test_loaded_path_names_where_the_loader_found_a_soname():
    import ctypes.util

    libc = ctypes.util.find_library("c")
    if libc is None:
        pytest.skip("find_library finds no C library here")
    path = keops_cuda.loaded_path(libc)
    assert os.path.isabs(path) and os.path.isfile(path)
    assert any(os.path.samefile(path, line.split()[-1]) for line in open("/proc/self/maps")
               if line.split()[-1].startswith("/") and os.path.exists(line.split()[-1]))
    assert keops_cuda.loaded_path("libdrsl_fast_absent.so.3") is None


def test_the_links_go_to_a_new_folder_of_their_own_by_default(tmp_path, monkeypatch):
    nvidia, _ = fake_wheel(str(tmp_path))
    monkeypatch.setattr(keops_cuda.tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    first = keops_cuda.environment({}, found=lambda name: None, roots=[nvidia])
    second = keops_cuda.environment({}, found=lambda name: None, roots=[nvidia])
    folders = [env["LD_LIBRARY_PATH"].split(os.pathsep)[0] for env in (first, second)]
    assert folders[0] != folders[1] and all(os.path.dirname(f) == str(tmp_path / "tmp") for f in folders)
    assert all(os.path.basename(f).startswith("drsl_fast_keops_cuda_") for f in folders)


def fake_keops(monkeypatch, gpu, message=""):
    monkeypatch.setitem(sys.modules, "pykeops", types.SimpleNamespace(
        __version__="2.3", config=types.SimpleNamespace(gpu_available=gpu)))
    monkeypatch.setitem(sys.modules, "keopscore", types.SimpleNamespace(cuda_config=types.SimpleNamespace(
        cuda_message=message, n_gpus=0, libnvrtc_folder="/l", cuda_include_path="/i", cuda_version=13000)))


def test_check_refuses_a_keops_without_gpu_support_and_says_why_and_what_it_found(monkeypatch):
    fake_keops(monkeypatch, gpu=False, message="CUDA libraries not found")
    with pytest.raises(RuntimeError, match=r"pykeops 2.3 has no GPU support here \(CUDA libraries not found; GPUs "
                                           r"found 0, NVRTC in /l, CUDA headers in /i, CUDA runtime 13000\)"):
        keops_cuda.check()
    fake_keops(monkeypatch, gpu=True)
    keops_cuda.check()


def test_a_worker_that_dies_in_native_code_gets_its_row_and_its_traceback_in_the_log(tmp_path, capsys,
                                                                                       monkeypatch):
    script = tmp_path / "dies.py"
    script.write_text(textwrap.dedent("""
        import ctypes, sys
        print("set-up the log should keep", file=sys.stderr, flush=True)
        ctypes.string_at(0)
    """))
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")
    row, = harness.run_fresh_many(str(script), [], [{"method": "m"}], timeout=60)
    assert row == {"method": "m", "error": "crashed: Fatal Python error: Segmentation fault"}
    log = capsys.readouterr().err
    assert "dies.py worker failed" in log and "set-up the log should keep" in log and "string_at" in log


def test_the_mode_distance_benchmark_asks_before_running_pykeops_on_a_gpu(monkeypatch):
    import bench_mode_distance

    fake_keops(monkeypatch, gpu=False)
    with pytest.raises(RuntimeError, match="its CUDA set-up failed"):
        bench_mode_distance.build_method("pykeops", "cuda")
    assert bench_mode_distance.build_method("pykeops", "cpu") is bench_mode_distance.keops_min


def test_the_report_lists_what_failed_at_the_realistic_size_not_what_was_skipped_by_design():
    import report

    size = dict(B=2, D=64, C=19, M=3, H=256, W=256)

    def row(method, pass_name, **result):
        return dict(method=method, size=size, **{"pass": pass_name}, **result)

    results = [row("cdist", "forward", time_ms=0.3, peak_extra_mib=1.0),
               row("cuda", "forward", time_ms=0.1, peak_extra_mib=1.0),
               row("pykeops", "forward", error="crashed: Fatal Python error: Segmentation fault"),
               row("pykeops", "forward+backward", error="crashed: Fatal Python error: Segmentation fault"),
               row("triton-tf32", "forward+backward", error="skipped: forward only")]
    text = report.mode_distance_section(dict(results=results))
    assert "| forward | cuda | 0.100 | 1.0 | 3.0x |  |  |" in text.splitlines()
    assert text.endswith("Not measured:\n\n- pykeops (forward, forward+backward): crashed: Fatal Python error: "
                         "Segmentation fault")
    assert "Not measured" not in report.mode_distance_section(dict(results=results[:2]))


def test_a_worker_that_times_out_gets_its_row_and_its_stderr_in_the_log(tmp_path, capsys):
    script = tmp_path / "hangs.py"
    script.write_text("import sys, time\nprint('compiling...', file=sys.stderr, flush=True)\ntime.sleep(60)\n")
    row, = harness.run_fresh_many(str(script), [], [{"method": "m"}], timeout=3)
    assert row == {"method": "m", "error": "timed out after 3 s"}
    log = capsys.readouterr().err
    assert "hangs.py worker failed" in log and "compiling..." in log
