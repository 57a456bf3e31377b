"""The shape of the code: lines, the import graph, and the files a run really walks through.

    python benchmarks/code_map.py [--json out/bench/code_map.json]

Prints the figures of the core-redesign issue: lines of ``blockrt/`` without ``coreml/``; the files on the run
path (every core file a function of which runs during ``blockrt.run`` + three passes + ``close`` of a small
real transformer, traced with ``sys.setprofile`` on every thread) and their lines; the files touched from
``blockrt.run`` to the loader's first disk read; the largest files; and the import graph (every import, at
module level or inside a function, resolved to a module): its cycles and any import against the layering
``blockrt.pipelines -> blockrt (the core) -> blockrt.partitioners`` (and none into ``benchmarks``).
``tests/test_layout.py`` holds the graph and file-size rules as tests.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"blockrt": "blockrt", "partitioners": "blockrt.partitioners", "pipelines": "blockrt.pipelines"}
LAYERS = ("partitioners", "core", "pipelines")  # each may import only from itself and the layers before it
MAX_FILE_LINES = 400  # for blockrt/ and partitioners/


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Installed module name -> source file, for the three folders of the package."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def layer(module: str) -> str | None:
    """Which layer a module of the package is in (None: outside the package)."""
    if module.startswith("blockrt.partitioners"):
        return "partitioners"
    if module.startswith("blockrt.pipelines"):
        return "pipelines"
    if module == "blockrt" or module.startswith("blockrt."):
        return "core"
    return None


def _imported(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, list[str], int]]:
    """(base module, names imported from it, line) for every import statement, relative ones resolved."""
    here = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = here
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            name = node.module or ""
            full = (f"{base}.{name}" if name else base) if node.level else name
            yield full, [a.name for a in node.names], node.lineno


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """Edges between the package's modules, and every (importer, imported, line) of them."""
    mods = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    edges = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        for base, names, line in _imported(tree, mod, path.name == "__init__.py"):
            targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in mods] or ([base] if base in mods else [])
            if not targets and base.startswith(("benchmarks", "bench_common")):
                targets = [base]
            for t in targets:
                if t != mod:
                    graph[mod].add(t) if t in graph else None
                    edges.append((mod, t, line))
    return graph, edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        comp.append(x)
                        if x == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif w not in index:
                index[w] = low[w] = counter
                counter += 1
                stack.append(w)
                on.add(w)
                work.append((w, iter(sorted(graph[w]))))
            elif w in on:
                low[v] = min(low[v], index[w])
    return out


def layering_violations(edges: list[tuple[str, str, int]]) -> list[str]:
    """Imports that run against ``partitioners <- core <- pipelines``, or into the benchmarks."""
    bad = []
    for src, dst, line in edges:
        a, b = layer(src), layer(dst)
        if b is None or (a is not None and LAYERS.index(b) > LAYERS.index(a)):
            bad.append(f"{src} (line {line}) imports {dst}")
    return bad


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines())


def long_files(root: Path = ROOT, limit: int = MAX_FILE_LINES) -> list[tuple[str, int]]:
    """Files of ``blockrt/`` and ``partitioners/`` over ``limit`` lines."""
    found = [(str(p.relative_to(root)), line_count(p)) for folder in ("blockrt", "partitioners")
             for p in (root / folder).rglob("*.py")]
    return sorted(((f, n) for f, n in found if n > limit), key=lambda x: -x[1])


def run_path() -> tuple[list[str], list[str]]:
    """Core files a function of which runs during a small streamed run, and those run before the first read."""
    import torch

    import blockrt
    from blockrt import loader, sources
    from blockrt.pipelines.toy import ToyConfig, ToyTransformer

    core = str(ROOT / "blockrt")
    seen: dict[str, None] = {}
    before_read: list[str] = []
    read = threading.Event()
    real_read = sources.read_exactly

    def first_read(*args, **kwargs):
        if not read.is_set():
            before_read.extend(seen)
            read.set()
        return real_read(*args, **kwargs)

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(core):
            seen.setdefault(frame.f_code.co_filename, None)

    torch.manual_seed(0)
    model = ToyTransformer(ToyConfig(dim=64, n_layers=4, n_heads=4, vocab=128, max_len=16)).eval()
    ids = torch.randint(0, 128, (1, 16))
    model(ids)  # torch's lazy imports happen outside the trace
    sources.read_exactly = loader.read_exactly = first_read  # every disk read of a block goes through it
    threading.setprofile(tracer)
    sys.setprofile(tracer)
    try:
        with blockrt.run(model, budget="64MB") as rt:
            for _ in range(3):
                rt(ids)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
        sources.read_exactly = loader.read_exactly = real_read
    return sorted(seen), sorted(before_read)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    core = [p for p in (ROOT / "blockrt").rglob("*.py") if "coreml" not in p.parts]
    graph, edges = import_graph()
    walked, before_read = run_path()
    rel = lambda f: str(Path(f).relative_to(ROOT))  # noqa: E731
    fig = {
        "core_lines_without_coreml": sum(line_count(p) for p in core),
        "core_files_without_coreml": len(core),
        "run_path_files": [rel(f) for f in walked],
        "run_path_lines": sum(line_count(Path(f)) for f in walked),
        "files_before_first_read": [rel(f) for f in before_read],
        "long_files": long_files(),
        "import_cycles": cycles(graph),
        "layering_violations": layering_violations(edges),
        "largest_core_files": sorted(((rel(str(p)), line_count(p)) for p in core), key=lambda x: -x[1])[:5],
    }
    print(f"blockrt/ without coreml/: {fig['core_lines_without_coreml']} lines in {fig['core_files_without_coreml']} files")
    print(f"run path (blockrt.run, 3 passes, close): {len(walked)} files, {fig['run_path_lines']} lines")
    print(f"from blockrt.run to the first disk read: {len(before_read)} files")
    print("largest core files: " + ", ".join(f"{f} {n}" for f, n in fig["largest_core_files"]))
    print(f"files over {MAX_FILE_LINES} lines in blockrt/ and partitioners/: {fig['long_files'] or 'none'}")
    print(f"import cycles: {len(fig['import_cycles'])} {fig['import_cycles'] or ''}")
    print(f"imports against the layering (pipelines -> core -> partitioners): {len(fig['layering_violations'])}")
    for v in fig["layering_violations"]:
        print("  " + v)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(fig, indent=1) + "\n")
    return fig


if __name__ == "__main__":
    main()
