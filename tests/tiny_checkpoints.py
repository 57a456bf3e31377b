"""Tiny random checkpoints in the real Hugging Face layouts (``save_pretrained``: ``config.json`` and safetensors,
single or sharded with ``*.safetensors.index.json``), and a fake hub cache holding them (``models--org--name/``
with ``blobs/``, ``snapshots/<commit>/`` symbolic links and ``refs/main``), all offline."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

V = 96  # vocabulary of the tiny language models


def save_llama(out: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """A 4-layer Llama causal LM (~0.3 MB) saved with ``save_pretrained``; sharded when ``max_shard_size``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return out


def save_gpt2(out: Path, seed: int = 0) -> Path:
    """A 4-layer GPT-2 LM (its head tied to the token embedding, stored once)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_embd=64, n_layer=4, n_head=4, n_positions=64)
    GPT2LMHeadModel(cfg).eval().save_pretrained(out)
    return out


def save_flux_pipeline_dir(out: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """A diffusers-style folder with ``transformer/`` holding a tiny ``FluxTransformer2DModel``."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                               axes_dims_rope=(4, 6, 6)).eval()
    m.save_pretrained(out / "transformer", **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    (out / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    return out


def flux_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(1, 16, 16, generator=g), "encoder_hidden_states": torch.randn(1, 4, 32, generator=g),
            "pooled_projections": torch.randn(1, 32, generator=g), "timestep": torch.tensor([0.5]),
            "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(4, 3)}


def fake_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Put ``folder``'s files into ``cache`` as the hub library lays a download out; returns the snapshot dir.

    Each file's bytes go to ``blobs/<sha256>``; ``snapshots/<commit>/<relative path>`` is a relative symbolic
    link to it; ``refs/main`` holds the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder)
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(f, blob)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``root`` (links not followed) with its size and mtime: a checkpoint that was not written
    to has the same state before and after."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    st = root.lstat()
    out["."] = (st.st_size, st.st_mtime_ns)
    return out


def make_read_only(root: Path) -> None:
    """Remove write permission from ``root`` and everything in it (blobs too)."""
    for p in sorted(root.rglob("*"), reverse=True):
        if not p.is_symlink():
            p.chmod(p.stat().st_mode & ~0o222)
    root.chmod(root.stat().st_mode & ~0o222)


def make_writable(root: Path) -> None:
    root.chmod(root.stat().st_mode | 0o200)
    for p in sorted(root.rglob("*")):
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | 0o200)
