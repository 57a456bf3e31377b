"""The shape of the code (``benchmarks/code_map.py``): imports run one way with no circles, no file of the
core or the partitioners grows past the limit, and the installed names are the package's own."""

from __future__ import annotations

import subprocess
import sys

from benchmark_modules import load_benchmark

code_map = load_benchmark("code_map")


def test_imports_have_no_circles():
    graph, _ = code_map.import_graph()
    assert len(graph) > 50  # every module of the three folders was read
    assert code_map.cycles(graph) == []


def test_imports_run_one_way():
    _, edges = code_map.import_graph()
    assert any(code_map.layer(a) == "core" and code_map.layer(b) == "partitioners" for a, b, _ in edges)
    assert code_map.layering_violations(edges) == []


def test_the_checker_sees_a_circle_and_a_wrong_way_import(tmp_path):
    for folder in ("blockrt", "partitioners", "pipelines"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "blockrt" / "a.py").write_text("from . import b\n")
    (tmp_path / "blockrt" / "b.py").write_text("def f():\n    from .a import x\n")  # inside a function: still an edge
    (tmp_path / "partitioners" / "p.py").write_text("from blockrt.a import y\n")
    (tmp_path / "blockrt" / "c.py").write_text("from blockrt.pipelines import q\nimport bench_common\n")
    graph, edges = code_map.import_graph(tmp_path)
    assert code_map.cycles(graph) == [["blockrt.a", "blockrt.b"]]
    bad = code_map.layering_violations(edges)
    assert len(bad) == 3 and any("partitioners.p" in v for v in bad) and any("bench_common" in v for v in bad)


def test_no_long_files_in_the_core_and_the_partitioners():
    assert code_map.long_files() == []


def test_installed_top_level_names_are_only_blockrt():
    """The design card's folders install under ``blockrt`` (``blockrt.partitioners``, ``blockrt.pipelines``): no
    generic top-level name such as ``pipelines`` can collide with a user's package."""
    code = ("import importlib.util, blockrt.partitioners, blockrt.pipelines.cli; "
            "print(importlib.util.find_spec('pipelines'), importlib.util.find_spec('partitioners'))")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "None"]
