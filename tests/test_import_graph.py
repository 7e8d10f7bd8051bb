"""The package's imports: no cycle, and no import from a lower layer of the design into a higher one.

Data flows one way (docs/architecture.md): cli -> eval -> generation -> static -> cache -> policies, codecs
-> kernels. The graph is read from the source with ``ast`` (function-level imports included, imports under
``TYPE_CHECKING`` left out, as they never run), so the test sees what running the code would import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "src" / "pyramidkv"

# module prefix -> prefixes it must never import (a lower layer never imports a higher one)
FORBIDDEN = {
    "pyramidkv.kernels": ("pyramidkv.cache", "pyramidkv.static", "pyramidkv.eval", "pyramidkv.cli",
                          "pyramidkv.policies", "pyramidkv.generation", "pyramidkv.models",
                          "pyramidkv.demo", "transformers"),
    "pyramidkv.codecs": ("pyramidkv.cache", "pyramidkv.static", "pyramidkv.eval", "pyramidkv.cli",
                         "pyramidkv.kernels", "pyramidkv.policies", "pyramidkv.generation",
                         "pyramidkv.models", "pyramidkv.demo", "transformers"),
    "pyramidkv.policies": ("pyramidkv.cache", "pyramidkv.static", "pyramidkv.eval", "pyramidkv.cli",
                           "pyramidkv.kernels", "pyramidkv.codecs", "pyramidkv.generation",
                           "pyramidkv.models", "pyramidkv.demo", "transformers"),
    "pyramidkv.cache": ("pyramidkv.static", "pyramidkv.eval", "pyramidkv.cli", "pyramidkv.generation",
                        "pyramidkv.models", "pyramidkv.demo"),
    "pyramidkv.static": ("pyramidkv.eval", "pyramidkv.cli", "pyramidkv.generation", "pyramidkv.models",
                         "pyramidkv.demo"),
    "pyramidkv.generation": ("pyramidkv.eval", "pyramidkv.cli", "pyramidkv.demo"),
    "pyramidkv.models": ("pyramidkv.cache", "pyramidkv.static", "pyramidkv.eval", "pyramidkv.cli",
                         "pyramidkv.demo"),
    "pyramidkv.eval": ("pyramidkv.cli", "pyramidkv.demo"),
    "pyramidkv.budgets": ("pyramidkv.cache", "pyramidkv.static", "pyramidkv.eval", "pyramidkv.cli"),
    "pyramidkv.errors": ("pyramidkv",),
    "pyramidkv.checks": ("pyramidkv.cache", "pyramidkv.static", "pyramidkv.eval", "pyramidkv.cli"),
}  # fmt: skip


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules (of the package, or outside it by top-level name) that ``path`` imports when it runs."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: a relative import; the package imports absolutely"
            for alias in node.names:  # `from pkg import module` imports that module
                full = f"{node.module}.{alias.name}"
                targets.add(full if full in modules else node.module)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def test_the_package_has_no_import_cycle():
    graph = _graph()
    internal = {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(internal[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(internal):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_runs_upward(layer):
    graph = _graph()
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if _under(module, layer)
        for target in targets
        if target != module and any(_under(target, banned) for banned in FORBIDDEN[layer])
    )
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_cli():
    """Only entry points (``python -m pyramidkv``) reach the command line."""
    graph = _graph()
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if not _under(module, "pyramidkv.cli") and module != "pyramidkv.__main__"
        for target in targets
        if _under(target, "pyramidkv.cli")
    )
    assert not wrong, "\n".join(wrong)


def test_the_graph_sees_imports_inside_functions(tmp_path):
    """The walker is able to fail: a function-level import is an edge like any other."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from pyramidkv.cli import main\n")
    assert "pyramidkv.cli" in _imports(source, {"pyramidkv.cli": source})


def test_the_public_api_matches_all():
    """Every name of ``pyramidkv.__all__`` imports from the top level, and is what its module defines."""
    import pyramidkv

    assert set(pyramidkv.__all__) == {"__version__", *pyramidkv._EXPORTS, *pyramidkv._RENAMED}
    for name in pyramidkv.__all__:
        assert getattr(pyramidkv, name) is not None, name
    from pyramidkv.cache.compressed import CompressedCache
    from pyramidkv.models import load

    assert pyramidkv.CompressedCache is CompressedCache and pyramidkv.load_model is load
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        _ = pyramidkv.missing
