"""The layout the README's op map and Layout sections describe: every op under
one name in every layer, folders that import under their own names, and no
import cycle between the library's modules."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# op file name -> the layers it has (the differentiable ops have a C++
# autograd file; class_sampling has no Triton kernel, is measured in
# bench_mmdl_losses and keeps its CUDA sort key in kernels/; entropy is
# measured in bench_pseudo_labels); every op's
# float64 reference is a section of drsl_fast/reference.py
LAYERS = ("drsl_fast/ops/{}.py", "csrc/cpu/{}.cpp", "csrc/cuda/{}.cu", "drsl_fast/triton_kernels/{}.py",
          "tests/test_{}.py", "bench/bench_{}.py")
AUTOGRAD = ("csrc/autograd/{}.cpp",)
OPS = {
    "mode_distance": LAYERS + AUTOGRAD,
    "mmdl_losses": LAYERS + AUTOGRAD,
    "pseudo_labels": LAYERS,
    "entropy": LAYERS[:-1] + AUTOGRAD,
    "class_sampling": LAYERS[:3] + LAYERS[4:5] + ("kernels/{}.h",),
}
# op -> its reference in drsl_fast/reference.py
REFERENCES = {"mode_distance": "mode_distance", "mmdl_losses": "mmdl_losses", "pseudo_labels": "SortedThresholds",
              "entropy": "entropy_map", "class_sampling": "sample_per_class"}


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_layer_of_an_op_carries_its_name(op):
    """Each layer's file under the op's name, and no other file of that name."""
    missing = [pattern.format(op) for pattern in OPS[op] if not os.path.isfile(os.path.join(ROOT, pattern.format(op)))]
    assert not missing
    assert len(OPS[op]) <= 7
    named = [p for p in all_files() if os.path.basename(p).split(".")[0] in (op, f"test_{op}", f"bench_{op}")]
    assert sorted(named) == sorted(pattern.format(op) for pattern in OPS[op])


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_op_has_its_reference(op):
    from drsl_fast import reference

    assert getattr(reference, REFERENCES[op]).__module__ == "drsl_fast.reference"


def all_files():
    """Every file of the repository's own folders, as paths from the root."""
    found = []
    for top in ("drsl_fast", "csrc", "kernels", "tests", "bench", "experiments", "docs"):
        for directory, _, files in os.walk(os.path.join(ROOT, top)):
            if "__pycache__" in directory or os.sep + "results" in directory:
                continue
            found += [os.path.relpath(os.path.join(directory, name), ROOT) for name in files]
    return found


def library_modules():
    """Dotted name -> path of every module of drsl_fast."""
    modules = {}
    for directory, _, files in os.walk(os.path.join(ROOT, "drsl_fast")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                modules[dotted[: -len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    return modules


def imported(module: str, path: str, modules) -> set:
    """The library modules ``module`` imports, at any depth of its code."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = [f"{target}.{alias.name}" for alias in node.names]
            submodules = [name for name in names if name in modules or name.endswith("._C")]
            found.update(submodules if len(submodules) == len(names) else [target, *submodules])
    return {name for name in found if name in modules and name != module}


def test_no_import_cycle():
    modules = library_modules()
    graph = {module: imported(module, path, modules) for module, path in modules.items()}
    state = {}

    def visit(module, trail):
        state[module] = "open"
        for child in sorted(graph[module]):
            assert state.get(child) != "open", " -> ".join(trail + [module, child])
            if child not in state:
                visit(child, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_folders_import_under_their_own_names():
    setup = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    assert "package_dir" not in setup
    for directory, _, files in os.walk(os.path.join(ROOT, "drsl_fast")):
        if "__pycache__" not in directory and any(name.endswith(".py") for name in files):
            assert "__init__.py" in files, f"{directory} holds modules but is not a package"
