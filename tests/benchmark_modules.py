"""Benchmark scripts imported by the tests as ``python benchmarks/<name>.py`` imports them, without touching
``sys.path``: ``benchmarks/<name>.py`` becomes the top-level module ``<name>``, and the sibling modules it
imports (``bench_common``, ``peers_worker``, ...) are loaded the same way first."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _siblings(path: Path) -> list[str]:
    """The ``benchmarks/`` modules that ``path`` imports, at the top or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return sorted(n for n in names if (BENCHMARKS / f"{n}.py").is_file())


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as the module ``name``, loaded once per test session.

    Example:
        >>> fullscale = load_benchmark("fullscale")  # and bench_common, which it imports
    """
    path = BENCHMARKS / f"{name}.py"
    loaded = sys.modules.get(name)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "")) != path:
            raise ImportError(f"module {name!r} is already imported from {loaded.__file__}, not from {path}")
        return loaded
    for sibling in _siblings(path):
        if sibling != name:
            load_benchmark(sibling)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
