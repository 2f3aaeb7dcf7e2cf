"""The layout the README's op map and Layout sections describe: every op under
one name in every layer, folders that import under their own names, and no
import cycle between the library's modules."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# op file name -> the layers it has (class_sampling has no Triton kernel and is
# measured in bench_mmdl_losses; entropy is measured in bench_pseudo_labels)
LAYERS = ("drsl_fast/ops/{}.py", "drsl_fast/reference/{}.py", "csrc/cpu/{}.cpp", "csrc/cuda/{}.cu",
          "drsl_fast/triton_kernels/{}.py", "tests/test_{}.py", "bench/bench_{}.py")
OPS = {
    "mode_distance": LAYERS,
    "mmdl_losses": LAYERS,
    "pseudo_labels": LAYERS,
    "entropy": LAYERS[:-1],
    "class_sampling": LAYERS[:4] + LAYERS[5:6],
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_layer_of_an_op_carries_its_name(op):
    missing = [pattern.format(op) for pattern in OPS[op] if not os.path.isfile(os.path.join(ROOT, pattern.format(op)))]
    assert not missing
    assert len(OPS[op]) <= 7


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
