"""``blockrt plan --weights``: real checkpoints (tiny, in the Hugging Face layouts) planned from a directory, a
diffusers subfolder or a repo id in an offline fake hub cache; errors are one line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from blockrt.partitioners import partition  # noqa: E402
from blockrt.pipelines.cli import main  # noqa: E402
from blockrt.pretrained import build_skeleton  # noqa: E402
from tiny_checkpoints import fake_hub_cache, save_flux_pipeline_dir, save_gpt2, save_llama  # noqa: E402


def _rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip().endswith("blocks")]


def test_plan_a_sharded_llama_directory(tmp_path: Path, capsys) -> None:
    ckpt = save_llama(tmp_path / "llama", max_shard_size="60KB")
    assert main(["plan", "--weights", str(ckpt), "--tokens", "16", "--points", "3"]) == 0
    out = capsys.readouterr().out
    n = len(partition(build_skeleton(ckpt)).blocks)
    assert f"plan for LlamaForCausalLM from {ckpt} on iphone15pro: {n} blocks" in out
    assert "compute from FLOPs on 16 tokens" in out and len(_rows(out)) == 3


def test_plan_a_repo_id_from_the_hub_cache(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub_cache(tmp_path / "hub", "org/tiny-gpt2", save_gpt2(tmp_path / "saved"))
    assert main(["plan", "--weights", "org/tiny-gpt2", "--budgets", "200KB,1MB"]) == 0
    out = capsys.readouterr().out
    assert "plan for GPT2LMHeadModel" in out and len(_rows(out)) == 2


def test_plan_a_diffusers_subfolder_prints_loads_only(tmp_path: Path, capsys) -> None:
    root = save_flux_pipeline_dir(tmp_path / "flux")
    assert main(["plan", "--weights", str(root), "--subfolder", "transformer", "--points", "2"]) == 0
    out = capsys.readouterr().out
    assert "plan for FluxTransformer2DModel" in out and "loads only" in out and len(_rows(out)) == 2


def test_plan_errors_are_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    assert main(["plan", "--weights", "gpt2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "huggingface-cli download gpt2" in err
    ckpt = save_llama(tmp_path / "llama")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5}))  # one layer more than stored
    assert main(["plan", "--weights", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "does not match the model" in err and "missing keys" in err
