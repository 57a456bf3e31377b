"""Random weights written in Open-Sora v1.2's real checkpoint layout (``checkpoint_layout.py``), tensor by tensor.

For benchmarks and tests without the real weights (spec §6): the same directory names, ``config.json``, file
names, sharding, key names, shapes and dtypes as the downloads (25 GB at the real sizes), or the same layout at
tiny sizes for tests.

Nothing builds a model: each tensor is drawn from its own seeded generator (seed, component, key), written,
and dropped, so memory stays at one tensor (the largest is T5's 526 MB embedding). Values are random but
never degenerate: where Open-Sora zero-initialises (the temporal blocks' output projections, the fps
embedder's second linear, the final linear) they are small and non-zero; the adaLN tables and ``t_block``
follow Open-Sora's own small inits; norm weights are near 1; embeddings N(0, 1); other weights
N(0, 1/sqrt(fan_in)) (T5's query 1/sqrt(fan_in * d_kv), as T5 has no attention scaling), so activations stay
O(1) through all layers (checked at the real depths and at T5's real width); the VAE's ``scale``/``shift`` are
the real values. ``.bin`` shards are torch.save's zip format, written record by record through torch's own zip
writer (``torch.load(..., weights_only=True, mmap=True)`` reads them).

Each directory is built under a temporary name and renamed, with a ``.blockrt-random.json`` marker (seed,
size, file sizes): a complete one is reused, so the writer doubles as a benchmark cache; a directory without
the marker (real weights) is never touched.

Example:
    >>> write_random_checkpoints("weights/random", which=("stdit3", "vae", "t5"), seed=0)      # ~25 GB
    >>> write_random_checkpoints(tmp, size="tiny", t5_format="safetensors")                  # tests, seconds

Command line: ``python -m blockrt.pipelines.opensora.random_weights ROOT --which stdit3,vae,t5``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from blockrt.files import replace_dir
from blockrt.pipelines.opensora.checkpoint_layout import (COMPONENTS, SIZES, T5_FORMATS, VAE_SCALE, VAE_SHIFT,
                                                          CheckpointSpec, PlannedTensor, TensorEntry, check_components,
                                                          check_size, checkpoint_plan, component_spec)
from blockrt.pipelines.opensora.tensor_files import write_safetensors, write_torch_bin

log = logging.getLogger(__name__)

if sys.byteorder != "little":  # pragma: no cover  (the raw tensor bytes written are the machine's)
    raise ImportError("random_weights.py writes little-endian files and needs a little-endian machine")

MARKER = ".blockrt-random.json"
MARKER_FORMAT = "blockrt-random-checkpoint"
GENERATOR_VERSION = 1  # bump when the values drawn for a (seed, key) change: old caches are then rewritten
TOKENIZER_FILES = ("spiece.model", "special_tokens_map.json", "tokenizer_config.json")

_NORM_STD = 0.02  # norm weights ~ N(1, 0.02); biases ~ N(0, 0.02)
_SMALL_GAIN = 0.25  # tensors Open-Sora zero-initialises: small, but every path still contributes
_REL_BIAS_STD = 0.5  # T5 relative position bias, added to O(1) attention logits


# -- how each tensor is drawn -----------------------------------------------------------------------------


def _normal(mean: float, std: float) -> tuple:
    return ("normal", float(mean), float(std))


def _fan_in(shape: Sequence[int]) -> int:
    return max(1, math.prod(shape[1:]))


def _generic_init(key: str, shape: tuple[int, ...]) -> tuple:
    if key.endswith(".bias"):
        return _normal(0.0, _NORM_STD)
    if len(shape) == 1:  # every 1-D weight in these models is a norm's (RMSNorm, GroupNorm)
        return _normal(1.0, _NORM_STD)
    return _normal(0.0, 1.0 / math.sqrt(_fan_in(shape)))


def _stdit3_rule(cfg: dict[str, Any]) -> Callable[[str, tuple[int, ...]], tuple]:
    C = int(cfg["hidden_size"])
    # Open-Sora zero-initialises these (temporal blocks start as identities); here: small, not zero.
    small = ("fps_embedder.mlp.2.weight", "final_layer.linear.weight")
    small_temporal = (".attn.proj.weight", ".cross_attn.proj.weight", ".mlp.fc2.weight")

    def rule(key: str, shape: tuple[int, ...]) -> tuple:
        if key == "rope.freqs":
            return ("rope", 2 * shape[0])
        if key == "y_embedder.y_embedding":  # the null caption stands in for T5 outputs, which are O(1)
            return _normal(0.0, 1.0)
        if key.endswith("scale_shift_table"):  # Open-Sora's own init: randn / sqrt(hidden)
            return _normal(0.0, 1.0 / math.sqrt(C))
        if key == "t_block.1.weight":  # Open-Sora's own init: N(0, 0.02)
            return _normal(0.0, 0.02)
        if key in small or (key.startswith("temporal_blocks.") and key.endswith(small_temporal)):
            return _normal(0.0, _SMALL_GAIN / math.sqrt(_fan_in(shape)))
        return _generic_init(key, shape)

    return rule


def _t5_rule(d_kv: int) -> Callable[[str, tuple[int, ...]], tuple]:
    def rule(key: str, shape: tuple[int, ...]) -> tuple:
        if key in ("shared.weight", "encoder.embed_tokens.weight"):
            return _normal(0.0, 1.0)
        if key.endswith("relative_attention_bias.weight"):
            return _normal(0.0, _REL_BIAS_STD)
        if key.endswith("SelfAttention.q.weight"):  # T5 does not scale q.k by 1/sqrt(d_kv): the init does
            return _normal(0.0, 1.0 / math.sqrt(_fan_in(shape) * d_kv))
        return _generic_init(key, shape)

    return rule


def _vae_rule(key: str, shape: tuple[int, ...]) -> tuple:
    if key in ("scale", "shift"):  # the real latent statistics, exactly
        return ("values", list(VAE_SCALE if key == "scale" else VAE_SHIFT))
    return _generic_init(key, shape)


def initializer(spec: CheckpointSpec) -> Callable[[TensorEntry], tuple]:
    """How each tensor of ``spec`` is drawn: ``("normal", mean, std)``, ``("values", [v, ...])`` (exact, e.g.
    the VAE's scale) or ``("rope", dim)`` (RoPE's frequency constant)."""
    cfg = spec.json_files["config.json"]
    if spec.component == "stdit3":
        rule = _stdit3_rule(cfg)
    elif spec.component == "t5":
        rule = _t5_rule(int(cfg["d_kv"]))
    else:
        rule = _vae_rule
    return lambda entry: rule(entry.key, entry.shape)


# -- drawing values ---------------------------------------------------------------------------------------


def _seed_for(seed: int, component: str, key: str) -> int:
    h = hashlib.sha256(f"{GENERATOR_VERSION}:{seed}:{component}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def random_tensor(component: str, entry: TensorEntry, init: tuple, seed: int) -> torch.Tensor:
    """The values of one tensor drawn as ``init`` says: a function of (seed, component, key) only, whatever
    else is written."""
    kind = init[0]
    dtype = getattr(torch, entry.dtype)
    if kind == "values":
        return torch.tensor(init[1], dtype=dtype).reshape(entry.shape)
    if kind == "rope":  # rotary_embedding_torch 0.5.3: 1 / 10000^(2i/dim)
        dim = init[1]
        return (1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))).to(dtype).reshape(entry.shape)
    if kind == "normal":
        _, mean, std = init
        g = torch.Generator().manual_seed(_seed_for(seed, component, entry.key))
        t = torch.randn(entry.shape, generator=g, dtype=torch.float32).mul_(std)
        if mean:
            t.add_(mean)
        return t.to(dtype)
    raise ValueError(f"unknown init {init!r} for {entry.key}")


# -- writing a directory ----------------------------------------------------------------------------------


def _write_json(path: Path, content: Any, index: bool) -> None:
    # transformers writes indexes with indent 2 and sorted keys, configs with indent 2 (+ newline)
    path.write_text(json.dumps(content, indent=2, sort_keys=index) + "\n")


def _tokenizer_files(tokenizer: str | Path | None) -> dict[str, Path]:
    if tokenizer is None:
        return {}
    t = Path(tokenizer)
    d = t.parent if t.name == "spiece.model" else t
    if not (d / "spiece.model").is_file():
        raise FileNotFoundError(f"tokenizer= must be a spiece.model or a directory holding one; {d} has none")
    return {name: d / name for name in TOKENIZER_FILES if (d / name).is_file()}


def _marker(spec: CheckpointSpec, seed: int, size: str, variant: str, files: dict[str, int]) -> dict[str, Any]:
    return {"format": MARKER_FORMAT, "generator_version": GENERATOR_VERSION, "component": spec.component,
            "seed": seed, "size": size, "variant": variant, "files": files}


def _complete(directory: Path, expect: dict[str, Any], json_files: dict[str, Any]) -> bool | None:
    """True: a complete random checkpoint as asked; False: ours but other (or damaged); None: not ours.

    The sizes, overrides and sharding asked for are those of the JSON files (config, index): compared by content.
    """
    marker = directory / MARKER
    if not marker.is_file():
        return None
    try:
        m = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    if m.get("format") != MARKER_FORMAT:
        return None
    same = all(m.get(k) == expect[k] for k in ("generator_version", "component", "seed", "size", "variant"))
    if not same or not isinstance(m.get("files"), dict):
        return False
    for name, size in m["files"].items():
        p = directory / name
        if not p.is_file() or p.stat().st_size != size:
            return False
    for name, content in json_files.items():
        try:
            if json.loads((directory / name).read_text()) != json.loads(json.dumps(content)):
                return False
        except (OSError, json.JSONDecodeError):
            return False
    return set(m["files"]) >= set(expect["files"])


def write_checkpoint(root: str | Path, spec: CheckpointSpec, *, seed: int = 0, size: str = "full",
                     tokenizer: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write one checkpoint directory ``root/spec.directory`` atomically (skipped when already complete)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / spec.directory
    tok_files = _tokenizer_files(tokenizer) if spec.component == "t5" else {}
    tok_id = ",".join(f"{n}:{hashlib.sha256(p.read_bytes()).hexdigest()[:16]}" for n, p in sorted(tok_files.items()))
    variant = "+".join([f.format for f in spec.files[:1]] + ([f"tokenizer({tok_id})"] if tok_files else []))
    expect_files = {f.name: 0 for f in spec.files} | {n: 0 for n in spec.json_files} | {n: 0 for n in tok_files}
    expect = _marker(spec, seed, size, variant, expect_files)
    if final.exists():
        state = _complete(final, expect, spec.json_files)
        if state is True:
            log.info("random checkpoint %s is complete (seed %d, %s): reused", final, seed, size)
            return final
        if state is None:
            raise FileExistsError(f"{final} exists and is not a random checkpoint written by blockrt (no {MARKER}); "
                                  "refusing to touch it; fix: choose another root")
        if not overwrite:
            raise FileExistsError(f"{final} holds a random checkpoint with other parameters or damaged files "
                                  f"(asked: seed {seed}, size {size!r}, {variant}); fix: pass overwrite=True or another root")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.directory}-", dir=root))
    try:
        sizes: dict[str, int] = {}
        for name, content in spec.json_files.items():
            _write_json(tmp / name, content, index=name.endswith(".index.json"))
        for name, src in tok_files.items():
            shutil.copyfile(src, tmp / name)
        init = initializer(spec)
        for f in spec.files:
            by_key = {e.key: e for e in f.tensors}

            def produce(key: str, by_key: dict[str, TensorEntry] = by_key) -> torch.Tensor:
                return random_tensor(spec.component, by_key[key], init(by_key[key]), seed)

            log.info("writing %s/%s (%d tensors, %.2f GB)", final, f.name, len(f.tensors),
                     sum(e.nbytes for e in f.tensors if e.storage is None) / 1e9)
            if f.format == "safetensors":
                write_safetensors(tmp / f.name, [(e.key, e.shape, e.dtype) for e in f.tensors], produce)
            else:
                write_torch_bin(tmp / f.name, [(e.key, e.shape, e.dtype, e.storage) for e in f.tensors], produce)
        for p in tmp.iterdir():
            sizes[p.name] = p.stat().st_size
        (tmp / MARKER).write_text(json.dumps(_marker(spec, seed, size, variant, sizes), indent=2) + "\n")
        os.chmod(tmp, 0o755)
        try:
            replace_dir(tmp, final)  # over an existing one of ours: other parameters, overwrite=True
        except OSError:
            if _complete(final, expect, spec.json_files) is not True:  # another writer finished first: fine
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_random_checkpoints(root: str | Path, which: Sequence[str] = COMPONENTS, seed: int = 0, *,
                             size: str = "full", t5_format: str = "bin", tokenizer: str | Path | None = None,
                             overrides: dict[str, dict[str, Any]] | None = None, overwrite: bool = False,
                             dry_run: bool = False) -> dict[str, Path] | list[PlannedTensor]:
    """Write random-weight checkpoints of Open-Sora v1.2's components in the real layout under ``root``.

    Args:
        root: parent directory; each component goes to its real directory name (``OpenSora-STDiT-v3``,
            ``OpenSora-VAE-v1.2``, ``t5-v1_1-xxl``).
        which: components among ``("stdit3", "vae", "t5")``.
        seed: every tensor's values depend on (seed, component, key) only.
        size: ``"full"`` (the real sizes: 4.8 + 1.6 + 19.1 GB) or ``"tiny"`` (same layout, test sizes).
        t5_format: ``"bin"`` (the real repo's pickles) or ``"safetensors"`` (the hub's ``refs/pr/3`` layout).
        tokenizer: a ``spiece.model`` (or its directory, with its JSON files) to copy into the T5 directory.
        overrides: per component, config fields replacing the size's (``{"t5": {"num_layers": 24}}``,
            ``{"vae": {"temporal": {"filters": 32}}}``); recorded in config.json, so loaders build the same.
        overwrite: replace a random checkpoint written with other parameters (never a directory without
            the marker, such as real weights).
        dry_run: return the ``checkpoint_plan`` instead of writing.

    Returns:
        ``{component: directory}``, or with ``dry_run`` the list of ``(file, key, shape, dtype)``.

    Example:
        >>> write_random_checkpoints("weights/random", which=("stdit3",), seed=0)
        {'stdit3': PosixPath('weights/random/OpenSora-STDiT-v3')}
    """
    comps = check_components(which)
    check_size(size)
    unknown = set(overrides or {}) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"overrides name unknown components {sorted(unknown)}; expected among {COMPONENTS}")
    if dry_run:
        return checkpoint_plan(comps, size=size, t5_format=t5_format, overrides=overrides)
    out = {}
    for comp in comps:
        spec = component_spec(comp, size, t5_format, (overrides or {}).get(comp))
        out[comp] = write_checkpoint(root, spec, seed=seed, size=size, tokenizer=tokenizer, overwrite=overwrite)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m blockrt.pipelines.opensora.random_weights ROOT [--which stdit3,vae,t5] [--seed 0] [--size full]``."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--which", default=",".join(COMPONENTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", choices=SIZES, default="full")
    ap.add_argument("--t5-format", choices=T5_FORMATS, default="bin")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = write_random_checkpoints(args.root, args.which.split(","), args.seed, size=args.size,
                                   t5_format=args.t5_format, tokenizer=args.tokenizer, overwrite=args.overwrite)
    for comp, path in out.items():  # type: ignore[union-attr]
        print(f"{comp}: {path}")


if __name__ == "__main__":
    main()
