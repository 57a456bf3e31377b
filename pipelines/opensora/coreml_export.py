"""``export_opensora``: Open-Sora v1.2 weights -> one CoreML package per block of T5, STDiT3 and the VAE.

One export directory (a blockrt CoreML export: ``export.json`` lists every package in run order, its I/O
and the wiring between them):

    t5_embed, t5_block_00..23, t5_final_norm,                    (int8 weights by default, as the paper)
    stdit3_embed, stdit3_block_00..27, stdit3_final,            (each block: functions "main" and "tdtm")
    vae_temporal_in, _mid, _stage_3.._0, _out, vae_spatial_in, _mid, _up_0.._3, _out

Example inputs are recorded from one streamed pass of the real pipeline pieces (``coreml_capture.py``);
each block's weights are read from the checkpoint just before it is converted and dropped after, so memory
holds one block at a time. Every wrapper is compared with what the original model computed in that pass
(``meta["parity"]`` in the manifest: ``torch.equal`` and the max abs error).

TDTM: a CoreML graph is static, so the merged forward is a second graph. Both are put in one multifunction
package (``coremltools.utils.save_multifunction``, iOS 18), whose weights are stored once when the two
functions' constants are equal, which they are: the package is ~1-2 % bigger than the plain one instead of 2x.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blockrt.coreml import ExportBlock, ExportManifest, ExportOptions, export_blocks
from blockrt.coreml.inspect import WEIGHTS_DIR, dir_bytes
from blockrt.coreml.manifest import MANIFEST
from blockrt.coreml.outdir import StagedDir
from blockrt.files import write_atomic
from blockrt.sources import CheckpointSource
from blockrt.pipelines.opensora import coreml_stdit3 as cs
from blockrt.pipelines.opensora import coreml_t5 as ct5
from blockrt.pipelines.opensora import coreml_vae as cv
from blockrt.pipelines.opensora.coreml_capture import Captured, Shapes, capture_stdit3, capture_t5, capture_vae, model_dirs

log = logging.getLogger(__name__)

MODELS = ("t5", "stdit3", "vae")
DEFAULT_PROMPT = "a red circle moving left on a blue background"
T5_QUANTIZE = "int8"  # the paper's T5 (used when ExportOptions.quantize is None)
TDTM_FUNCTION = "tdtm"
Progress = Callable[[int, int, str], None]


# -- weights, one block at a time ----------------------------------------------------------------------


def _names(model: nn.Module, module: nn.Module) -> dict[int, list[str]]:
    """For each tensor ``module`` holds: its id -> its state-dict names in ``model`` (tied ones share an id)."""
    own = {id(t) for t in (*module.parameters(), *module.buffers())}
    out: dict[int, list[str]] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        if id(t) in own:
            out.setdefault(id(t), []).append(k)
    return out


class Binder:
    """Reads the tensors of one wrapper from the checkpoint into the model, and puts ``meta`` back after."""

    def __init__(self, model: nn.Module, weights: Path) -> None:
        self.model, self.source = model, CheckpointSource(weights)

    def _set(self, names: list[str], value: torch.Tensor, old: torch.Tensor) -> None:
        if isinstance(old, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        for name in names:
            path, _, attr = name.rpartition(".")
            mod = self.model.get_submodule(path)
            (mod._parameters if attr in mod._parameters else mod._buffers)[attr] = value

    def bind(self, module: nn.Module) -> list[tuple[list[str], torch.Tensor]]:
        """Load every tensor of ``module`` that is still on ``meta``; returns what to ``unbind``."""
        state = self.model.state_dict(keep_vars=True)
        bound = []
        for names in _names(self.model, module).values():
            old = state[names[0]]
            if old.device.type != "meta":
                continue  # a buffer computed at build time, or loaded for the capture (kept)
            stored = next((n for n in names if n in self.source.segments), None)
            if stored is None:
                raise KeyError(f"{self.source} holds none of {names}; fix: check the checkpoint matches config.json")
            self._set(names, self.source.read_tensor(stored), old)
            bound.append((names, old))
        return bound

    def unbind(self, bound: list[tuple[list[str], torch.Tensor]]) -> None:
        for names, old in bound:
            self._set(names, old.detach(), old)


# -- parts of each model ---------------------------------------------------------------------------------


def _run_part(module: nn.Module, inputs: tuple) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = module.eval()(*inputs)
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def _parity(out: tuple[torch.Tensor, ...], expected: tuple) -> dict[str, Any]:
    equal = all(a.shape == b.shape and torch.equal(a, b.to(a.dtype)) for a, b in zip(out, expected))
    err = max(float((a.double() - b.double()).abs().max()) if a.shape == b.shape else float("inf")
              for a, b in zip(out, expected))
    return {"equal": bool(equal), "max_abs_error": err, "against": "the original model in a captured pipeline pass"}


Part = tuple[str, nn.Module, tuple, tuple, dict[str, Any]]  # name, module, inputs, expected outputs, ExportBlock kw


def t5_parts(cap: Captured) -> list[Part]:
    model, calls = cap.model, cap.calls
    L = cap.extra["input_ids"].shape[1]
    mask_add = ct5.additive_mask(cap.extra["mask"])  # (1, 1, 1, L)
    pb = calls["block.0"].output[1]
    parts: list[Part] = []
    for name, mod, ref in ct5.t5_parts(model, L):
        ins, outs = ct5.t5_io(name)
        if name == "t5_embed":
            inputs, expected = (cap.extra["input_ids"],), (calls["block.0"].args[0],)
        elif name == "t5_final_norm":
            inputs, expected = (calls["final_layer_norm"].args[0],), (calls["final_layer_norm"].output,)
        else:
            c = calls[f"block.{int(name.rsplit('_', 1)[1])}"]
            first = name == ct5.block_name(0)
            inputs = (c.args[0], mask_add) if first else (c.args[0], pb, mask_add)
            expected = (c.output[0], c.output[1]) if first else (c.output[0],)
        parts.append((name, mod, inputs, expected, {"input_names": ins, "output_names": outs, "reference": ref}))
    return parts


def _layer_inputs(calls: dict, i: int) -> tuple[tuple, tuple]:
    s, t = calls[f"spatial.{i}"], calls[f"temporal.{i}"]
    y_mask = s.kwargs["y_mask"]
    add = torch.zeros(y_mask.shape).masked_fill(~y_mask, ct5.MASK_MIN)  # (B, L) additive
    cos, sin = t.kwargs["rope"]
    return (s.args[0], s.args[1], s.args[2], add, cos, sin), (t.output,)


def stdit3_parts(cap: Captured, shapes: Shapes, tdtm: bool) -> list[Part]:
    model, calls = cap.model, cap.calls
    root = calls["model"]
    z, t, y = root.args[0], root.args[1].float(), root.args[2]
    mask = root.kwargs["mask"]
    embed = cs.STDiT3Embed(model, shapes.latent, float(shapes.height), float(shapes.width))
    s0 = calls["spatial.0"]
    y_add = torch.zeros(s0.kwargs["y_mask"].shape).masked_fill(~s0.kwargs["y_mask"], ct5.MASK_MIN)
    expected = (s0.args[0], s0.args[2], calls["final_layer"].args[1], s0.args[1], y_add)
    ins, outs = cs.EMBED_IO
    parts: list[Part] = [("stdit3_embed", embed, (z, t, y, mask, cap.extra["fps"]), expected,
                          {"input_names": ins, "output_names": outs})]
    T, H, W = embed.grid
    for i in range(model.config.depth):
        sp, tp = model.spatial_blocks[i], model.temporal_blocks[i]
        inputs, exp = _layer_inputs(calls, i)
        kw = {"input_names": cs.LAYER_IO[0], "output_names": cs.LAYER_IO[1],
              "reference": cs.ReferenceLayer(sp, tp, T, H * W)}
        parts.append((cs.block_name(i), cs.STDiT3Layer(sp, tp, T, H * W), inputs, exp, kw))
        if tdtm:
            inputs, exp = _layer_inputs(cap.extra["tdtm"], i)
            kw = {**kw, "reference": cs.ReferenceLayer(sp, tp, T, H * W, merged=True),
                  "meta": {"function_of": cs.block_name(i)}}
            parts.append((cs.block_name(i) + "_" + TDTM_FUNCTION, cs.STDiT3Layer(sp, tp, T, H * W, merged=True),
                          inputs, exp, kw))
    fin = calls["final_layer"]
    parts.append(("stdit3_final", cs.STDiT3Final(model, shapes.latent), (fin.args[0], fin.args[1]), (root.output,),
                  {"input_names": cs.FINAL_IO[0], "output_names": cs.FINAL_IO[1],
                   "reference": cs.STDiT3Final(model, shapes.latent, reference=True)}))
    return parts


def vae_parts(cap: Captured, last: dict[str, tuple]) -> Iterator[Part]:
    """Parts whose example input is the previous part's output: ``last["out"]``, set by the consumer once it
    has run the part just yielded (its weights are only bound then)."""
    vae = cap.model
    nk = cap.extra["chunk_frames"]
    refs = dict(cv.temporal_parts(vae, nk, reference=True))
    chains = [(cv.temporal_parts(vae, nk), cap.extra["chunk"], cap.extra["temporal_out"]),
              (cv.spatial_parts(vae), cap.extra["frames"], cap.extra["rgb"])]
    for parts, act, final in chains:
        for k, (name, mod) in enumerate(parts):
            # fixed shapes: coremltools 9's group_norm converter rejects a symbolic (RangeDim or enumerated) dim
            kw = {"input_names": ("x",), "output_names": ("out",), "reference": refs.get(name)}
            yield name, mod, (act,), (final,) if k == len(parts) - 1 else (), kw
            act = last["out"][0]


# -- the export ---------------------------------------------------------------------------------------------


def export_opensora(weights: str | Path, out_dir: str | Path, models: Sequence[str] = MODELS,
                    options: ExportOptions = ExportOptions(), *, t5_quantize: str | None = T5_QUANTIZE,
                    resolution: str = "144p", aspect: str = "3:4", frames: int = 17, prompt: str = DEFAULT_PROMPT,
                    tdtm: bool = True, budget: int | str = "3.3GB", progress: Progress | None = None,
                    overwrite: bool = False) -> ExportManifest:
    """Export every block of the chosen Open-Sora models to ``out_dir`` (see the module docstring).

    Args:
        weights: directory holding ``t5-v1_1-xxl/``, ``OpenSora-STDiT-v3/``, ``OpenSora-VAE-v1.2/`` (those of
            ``models`` are required).
        out_dir: the export directory (new, empty, or a previous export with ``overwrite``).
        models: among ``("t5", "stdit3", "vae")``, exported in that run order.
        options: precision, quantization (all models), target, checks.
        t5_quantize: T5's weight compression when ``options.quantize`` is None ("int8", as the paper; None = off).
        resolution, aspect, frames: the video the packages are traced for (fixed shapes, see the manifest).
        prompt: the text traced through T5.
        tdtm: add the TDTM (merged-frames) function to every STDiT3 block package.
        budget: memory budget of the streamed capture passes.
        progress: ``progress(done, total, package_name)`` after each package.
        overwrite: replace a previous export in ``out_dir``.
    """
    models = tuple(models)
    if not models or set(models) - set(MODELS) or len(set(models)) != len(models):
        raise ValueError(f"models must be distinct names among {MODELS}, got {models}")
    shapes = Shapes.of(resolution, aspect, frames)
    dirs = model_dirs(Path(weights))
    missing = [m for m in models if m not in dirs]
    if missing:
        raise FileNotFoundError(f"{weights} lacks the weights of {missing} (expected sub-directories "
                                f"{[str(Path(weights) / d) for d in ('t5-v1_1-xxl', 'OpenSora-STDiT-v3', 'OpenSora-VAE-v1.2')]}); "
                                "fix: point weights at the download directory or choose models")
    stage = StagedDir(out_dir, overwrite)  # refuses a non-export directory before any work
    try:
        caps: dict[str, Captured] = {}
        y = mask = None
        if "t5" in models or ("stdit3" in models and "t5" in dirs):
            caps["t5"] = capture_t5(dirs["t5"], prompt, budget)
            y, mask = caps["t5"].extra["y"], caps["t5"].extra["mask"]
        if "stdit3" in models:
            caps["stdit3"] = capture_stdit3(dirs["stdit3"], shapes, y, mask, budget, tdtm)
        if "vae" in models:
            caps["vae"] = capture_vae(dirs["vae"], shapes, budget)
        parts: list[tuple[str, Part]] = []
        if "t5" in models:
            q = options.quantize if options.quantize is not None else t5_quantize
            parts += [("t5", (n, m, i, e, {**kw, "quantize": q})) for n, m, i, e, kw in t5_parts(caps["t5"])]
        if "stdit3" in models:
            parts += [("stdit3", p) for p in stdit3_parts(caps["stdit3"], shapes, tdtm)]
        n_vae = 0
        if "vae" in models:
            vae = caps["vae"].model
            n_vae = len(cv.temporal_parts(vae, 1)) + len(cv.spatial_parts(vae))
        total = len(parts) + n_vae

        def blocks() -> Iterator[ExportBlock]:
            last: dict[str, tuple] = {}
            vae_seq = vae_parts(caps["vae"], last) if "vae" in models else iter(())
            for model_name, part in _chain(iter(parts), vae_seq):
                name, mod, inputs, expected, kw = part
                binder = Binder(caps[model_name].model, caps[model_name].weights)
                bound = binder.bind(mod)
                try:
                    meta = dict(kw.pop("meta", {}))
                    last["out"] = _run_part(mod, inputs)
                    if expected:
                        meta["parity"] = _parity(last["out"], expected)
                    meta["model"] = model_name
                    yield ExportBlock(name, mod, inputs, meta=meta, **kw)
                finally:
                    binder.unbind(bound)

        build = stage.path / "build"
        manifest = export_blocks(blocks(), build, options, progress=progress, total=total,
                                 wiring=wiring(models, caps), extra=_extra(shapes, models, tdtm, caps),
                                 pinned=["y_embedder.y_embedding", "rope.freqs"] if "stdit3" in models else [])
        if tdtm and "stdit3" in models:
            manifest = merge_tdtm_functions(build, manifest)
        for p in build.iterdir():
            os.rename(p, stage.path / p.name)
        build.rmdir()
        stage.commit()
    finally:
        stage.discard()
    return manifest


def _chain(parts: Iterator[tuple[str, Part]], vae_seq: Iterator[Part]) -> Iterator[tuple[str, Part]]:
    yield from parts
    for p in vae_seq:
        yield "vae", p


# -- manifest contents ---------------------------------------------------------------------------------------


def wiring(models: Sequence[str], caps: dict[str, Captured]) -> dict[str, str]:
    """``"<package>.<input>" -> "<package>.<output>" | "input:<name>"`` for the whole run order."""
    w: dict[str, str] = {}
    if "t5" in models:
        prev = "t5_embed.hidden"
        w["t5_embed.input_ids"] = "input:input_ids"
        for i in range(len(caps["t5"].model.encoder.block)):
            b = ct5.block_name(i)
            w[f"{b}.hidden"], w[f"{b}.mask"] = prev, "input:t5_mask"
            if i:
                w[f"{b}.position_bias"] = f"{ct5.block_name(0)}.position_bias"
            prev = f"{b}.hidden_out"
        w["t5_final_norm.hidden"] = prev
    if "stdit3" in models:
        for name in cs.EMBED_IO[0]:
            w[f"stdit3_embed.{name}"] = f"input:{name}"
        prev = "stdit3_embed.x"
        for i in range(caps["stdit3"].model.config.depth):
            b = cs.block_name(i)
            w.update({f"{b}.x": prev, f"{b}.y_tokens": "stdit3_embed.y_tokens", f"{b}.t_mlp": "stdit3_embed.t_mlp",
                      f"{b}.y_mask": "stdit3_embed.y_mask", f"{b}.rope_cos": "input:rope_cos",
                      f"{b}.rope_sin": "input:rope_sin"})
            prev = f"{b}.x_out"
        w["stdit3_final.x"], w["stdit3_final.t"] = prev, "stdit3_embed.t"
    if "vae" in models:
        vae = caps["vae"].model
        for parts, source in ((cv.temporal_parts(vae, 1), "input:latent_chunk"), (cv.spatial_parts(vae), "input:frames")):
            for name, _ in parts:
                w[f"{name}.x"] = source
                source = f"{name}.out"
    return w


APP_INPUTS = {
    "input_ids": "T5 token ids (1, L): the prompt tokenised, EOS appended, padded with 0 to L",
    "t5_mask": "(1, 1, 1, L) float: 0 for text tokens and EOS, MASK_MIN (float32 min) for padding",
    "z": "latent (2, 4, T, H, W): cat([z, z]) (CFG)", "timestep": "(2,) the sampler's t, twice",
    "y": "(2, 1, L, caption_channels): cat([t5_final_norm.last_hidden_state, y_embedder.y_embedding])",
    "mask": "(1, L) int: the token mask (1 = text or EOS)", "fps": "(1,) frames per second (24)",
    "rope_cos": "(T, head_dim) cos of pos * rope.freqs[j // 2] (function 'tdtm': ceil(T/2) positions)",
    "rope_sin": "as rope_cos, sin",
    "latent_chunk": "(1, 4, Tz, H, W) denoised latent frames of one temporal chunk",
    "frames": "(F, 4, H, W) temporal-VAE output frames, F <= micro-batch size",
}


def _extra(shapes: Shapes, models: Sequence[str], tdtm: bool, caps: dict[str, Captured]) -> dict[str, Any]:
    d: dict[str, Any] = {"pipeline": "opensora-v1.2", "models": list(models), "resolution": shapes.resolution,
                         "aspect": shapes.aspect, "height": shapes.height, "width": shapes.width,
                         "frames": shapes.frames, "latent": list(shapes.latent), "app_inputs": APP_INPUTS}
    if "stdit3" in models:
        model = caps["stdit3"].model
        grid = cs.patch_grid(model, shapes.latent)
        d["stdit3"] = {"grid": list(grid), "tokens": grid[0] * grid[1] * grid[2], "head_dim": model.config.head_dim,
                       "rope_positions": grid[0], "tdtm": tdtm, "tdtm_function": TDTM_FUNCTION if tdtm else None,
                       "tdtm_rope_positions": (grid[0] + 1) // 2}
    if "vae" in models:
        d["vae"] = {"chunk_frames": caps["vae"].extra["chunk_frames"],
                    "micro_batch": int(caps["vae"].extra["frames"].shape[0])}
    return d


def merge_tdtm_functions(build: Path, manifest: ExportManifest) -> ExportManifest:
    """Fold each ``stdit3_block_i_tdtm`` package into ``stdit3_block_i`` as its function ``"tdtm"``.

    ``save_multifunction`` stores a weight once when both functions hold the same constant, so the merged
    package costs little more than the plain one; ``meta["bytes_as_two_packages"]`` records the alternative.
    """
    from dataclasses import replace

    from coremltools.models.utils import MultiFunctionDescriptor, save_multifunction

    by_name = {p.name: p for p in manifest.packages}
    keep = []
    for p in manifest.packages:
        if "function_of" in p.meta:
            continue
        t = by_name.get(f"{p.name}_{TDTM_FUNCTION}")
        if t is not None:
            desc = MultiFunctionDescriptor()
            desc.add_function(str(build / p.file), src_function_name="main", target_function_name="main")
            desc.add_function(str(build / t.file), src_function_name="main", target_function_name=TDTM_FUNCTION)
            desc.default_function_name = "main"
            tmp = build / f".{p.name}.multifunction.mlpackage"
            save_multifunction(desc, str(tmp))
            shutil.rmtree(build / p.file)
            shutil.rmtree(build / t.file)
            os.rename(tmp, build / p.file)
            tdtm = {"inputs": [io.to_dict() for io in t.inputs], "outputs": [io.to_dict() for io in t.outputs],
                    "checks": t.checks, "parity": t.meta.get("parity"), "seconds": t.seconds}
            p = replace(p, bytes=dir_bytes(build / p.file),
                        weight_bytes=dir_bytes(build / p.file / WEIGHTS_DIR) if (build / p.file / WEIGHTS_DIR).is_dir() else 0,
                        meta={**p.meta, "functions": ["main", TDTM_FUNCTION], TDTM_FUNCTION: tdtm,
                              "bytes_as_two_packages": p.bytes + t.bytes})
        keep.append(replace(p, order=len(keep)))
    merged = ExportManifest(packages=keep, options=manifest.options, wiring=manifest.wiring, pinned=manifest.pinned,
                            extra=manifest.extra, versions=manifest.versions)
    merged.validate()
    text = merged.to_json().encode()
    write_atomic(build / MANIFEST, lambda f: f.write(text))
    return merged


def tiny_random_weights(cache: str | Path) -> Path:
    """Tiny random checkpoints of the three models in the real layout (with a small trained tokenizer),
    written once into ``cache`` and reused: what ``blockrt export coreml`` exports without ``--weights``."""
    from blockrt.pipelines.opensora.random_weights import write_random_checkpoints
    from blockrt.pipelines.opensora.t5 import train_tiny_tokenizer

    cache = Path(cache)
    tok = cache / "tokenizer"
    if not (tok / "spiece.model").exists():
        train_tiny_tokenizer([DEFAULT_PROMPT, "a green square moving up on a white background"] * 40, tok, vocab_size=60)
    write_random_checkpoints(cache, size="tiny", t5_format="safetensors", tokenizer=tok)
    return cache
