"""The layout's rules, read from the imports themselves (ast, every import including those inside functions):
the torch-free part of the engine is the package wan22.request, headless/ and runpod_worker/ import nothing else
of the engine, and the engine has no import cycles."""
import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCH_FREE = "wan22.request"
# what the torch-free part may import besides the standard library and itself: images, their arrays, HTTP
TORCH_FREE_THIRD_PARTY = {"PIL", "numpy", "requests"}
# what would pull torch, a model library or ComfyUI into the runner or the worker
HEAVY = {"torch", "torchvision", "diffusers", "transformers", "safetensors", "peft", "torchao", "comfy", "folder_paths",
         "nodes", "execution", "server"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports(path: Path):
    """(absolute module name, line) of every import in `path`; `from X import a` also yields X.a (a may be a module)."""
    tree = ast.parse(path.read_text(), str(path))
    name = module_name(path)
    package = name if is_package(path) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            yield base, node.lineno
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno


def python_files(*folders: str):
    for folder in folders:
        yield from sorted((REPO / folder).rglob("*.py"))


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_torch_free_part_is_one_package_importing_no_torch_and_nothing_else_of_the_engine():
    files = list(python_files(TORCH_FREE.replace(".", "/"))) + [REPO / "wan22" / "__init__.py"]  # importing it runs wan22/__init__
    bad = []
    for path in files:
        for name, line in imports(path):
            inside = name == "wan22" or name.startswith(TORCH_FREE + ".") or name == TORCH_FREE
            if top(name) == "wan22" and not inside:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
            elif top(name) not in ("wan22", "__future__") and top(name) not in sys.stdlib_module_names \
                    and top(name) not in TORCH_FREE_THIRD_PARTY:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    allowed = ", ".join(sorted(TORCH_FREE_THIRD_PARTY))
    assert not bad, f"the torch-free package wan22.request may import only itself, the standard library and {allowed}:\n" + "\n".join(bad)


@pytest.mark.parametrize("folder", ["headless", "runpod_worker"])
def test_runner_and_worker_import_only_the_torch_free_part_of_the_engine(folder):
    bad = []
    for path in python_files(folder):
        for name, line in imports(path):
            if top(name) == "wan22" and name not in ("wan22", TORCH_FREE) and not name.startswith(TORCH_FREE + "."):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name} (only {TORCH_FREE} is torch-free)")
            if top(name) in HEAVY:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def engine_graph():
    """module -> the engine modules it imports (a `from package import name` counts as the module `name`
    when there is one, else as the package)."""
    modules = {module_name(p): p for p in python_files("wan22")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target, _ in imports(path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + ".") and target != "wan22":
                edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_engine_has_no_import_cycles():
    cycle = find_cycle(engine_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_reader_sees_relative_and_lazy_imports(tmp_path, monkeypatch):
    package = tmp_path / "wan22" / "request"
    package.mkdir(parents=True)
    (package / "x.py").write_text("from ..pipeline import run\n\ndef f():\n    import torch\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    found = {name for name, _ in imports(package / "x.py")}
    assert {"wan22.pipeline", "wan22.pipeline.run", "torch"} <= found
