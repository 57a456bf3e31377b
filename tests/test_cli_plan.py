"""``blockrt plan --weights``: real checkpoints (tiny, in the Hugging Face layouts) planned from a directory, a
diffusers subfolder or a repo id in an offline fake hub cache; errors are one line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

import zoo_models  # noqa: E402
from blockrt.partitioners import partition  # noqa: E402
from blockrt.pipelines import plan_inputs  # noqa: E402
from blockrt.planning import block_flops  # noqa: E402
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


def test_plan_a_diffusers_subfolder_from_flops(tmp_path: Path, monkeypatch, capsys) -> None:
    """A diffusers denoiser is planned from FLOPs on latents shaped by --height/--width; the compute it adds
    shows in the predicted times (longer than the loads alone); a class with no known inputs plans its loads."""
    root = save_flux_pipeline_dir(tmp_path / "flux")
    args = ["plan", "--weights", str(root), "--subfolder", "transformer", "--budgets", "300KB",
            "--height", "128", "--width", "64", "--tokens", "4", "--profile", "laptop-nvme"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "plan for FluxTransformer2DModel" in out and len(_rows(out)) == 1
    assert "compute from FLOPs on hidden_states (1, 32, 16), encoder_hidden_states (1, 4, 32)" in out
    with_compute = _rows(out)[0]
    monkeypatch.delitem(plan_inputs.BY_CLASS, "FluxTransformer2DModel")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "no example input for FluxTransformer2DModel" in out and "loads only" in out
    seconds = [_seconds(r.split()[2]) for r in (with_compute, _rows(out)[0])]  # the sequential column
    assert seconds[0] > seconds[1]


def _seconds(text: str) -> float:
    for unit, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if text.endswith(unit):
            return float(text[:-len(unit)]) * scale
    raise ValueError(text)


ZOO = ["flux", "sd3", "pixart", "cogvideox", "ltx_video", "wan", "hunyuan_video", "unet", "unet_sdxl", "vae"]


@pytest.mark.parametrize("name", ZOO)
def test_example_inputs_run_every_block_on_meta(name: str) -> None:
    """Each diffusers family's example inputs (shaped from its config) run a meta pass that reaches every block."""
    model = zoo_models.build(name)[0].to("meta")
    size = plan_inputs.Size(height=64, width=64, frames=5, tokens=4)
    inputs = plan_inputs.example_inputs(model, size)
    flops, _ = block_flops(model, partition(model), (), inputs)
    assert all(f > 0 for f in flops), name


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
