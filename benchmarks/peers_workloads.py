"""The two workloads of the peer comparison (``benchmarks/peers.py``): what model, which checkpoint, which inputs.

- ``t5``: Hugging Face ``T5EncoderModel`` (t5-v1.1-large shape at full size: d_model 1024, d_ff 2816, 24 layers
  of 16 heads x 64, gated-gelu, vocab 32128, 1.36 GB fp32), random weights written once as a real HF
  safetensors checkpoint (config.json + two shards + index), fed the same ``tokens`` token ids every pass.
- ``stdit3``: Open-Sora's STDiT3 (XL/2 at full size, the 4.8 GB random checkpoint ``stdit3_fullsize.py``
  caches), run as a denoising loop with the pipeline's sampler and inputs (``pipelines/opensora``): one pass =
  one CFG model call (batch 2) of the RFLOW loop, the null caption read from the checkpoint.

A workload is a JSON-able dict (``prepare``) so a fresh worker process can rebuild it; the functions here
build its models and run its passes the same way for every contender.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

WORKLOADS = ("t5", "stdit3")
STDIT3_SIZES = ("xl", "mid")
SEED = 0
# t5-v1.1-large (google/t5-v1_1-large config.json); the rest (vocab 32128, d_kv 64, gated-gelu) as XXL
T5_LARGE = dict(d_model=1024, d_ff=2816, num_heads=16, num_layers=24, num_decoder_layers=24)
T5_QUICK = dict(d_model=128, d_ff=352, d_kv=32, num_heads=4, num_layers=6, num_decoder_layers=6)  # over "tiny"
STDIT3_MID = dict(depth=14, hidden_size=768, num_heads=12)
STDIT3_QUICK = dict(depth=4, hidden_size=128, num_heads=4)  # over "tiny" (caption_channels 64)
T5_TOKENS, T5_TOKENS_QUICK = 300, 48
# STDiT3 video: 17 frames at 64x64 px -> latent (5, 8, 8), a 20-token prompt, CFG 7 (the pipeline's defaults)
STDIT3_VIDEO = dict(frames=17, height=64, width=64, prompt_tokens=20, cfg_scale=7.0, fps=24)
STDIT3_VIDEO_QUICK = dict(frames=17, height=32, width=32, prompt_tokens=8, cfg_scale=7.0, fps=24)


def prepare(name: str, *, quick: bool, cache: Path, stdit3_size: str = "xl") -> dict[str, Any]:
    """Write (once; cached) the checkpoint of workload ``name`` and describe it as a JSON-able dict."""
    from blockrt.pipelines.opensora.random_weights import write_random_checkpoints

    if name == "t5":
        root, size, over = (cache / "peers-t5-quick", "tiny", T5_QUICK) if quick else (cache / "peers-t5-large", "full", T5_LARGE)
        d = write_random_checkpoints(root, which=("t5",), size=size, t5_format="safetensors", seed=SEED,
                                     overrides={"t5": over})["t5"]
        cfg = json.loads((d / "config.json").read_text())
        title = (f"T5EncoderModel (t5-v1.1-large shape: d_model {cfg['d_model']}, d_ff {cfg['d_ff']}, "
                 f"{cfg['num_layers']} layers, {cfg['num_heads']} heads)") if not quick else \
            f"T5EncoderModel (smoke: d_model {cfg['d_model']}, {cfg['num_layers']} layers)"
        return {"name": name, "dir": str(d), "title": title, "tokens": T5_TOKENS_QUICK if quick else T5_TOKENS,
                "vocab": cfg["vocab_size"], "bytes": _checkpoint_bytes(d)}
    if name == "stdit3":
        if quick:
            root, size, over = cache / "peers-stdit3-quick", "tiny", STDIT3_QUICK
        elif stdit3_size == "xl":
            root, size, over = cache / "full", "full", {}  # the checkpoint stdit3_fullsize.py caches
        elif stdit3_size == "mid":
            root, size, over = cache / "peers-stdit3-mid", "full", STDIT3_MID
        else:
            raise ValueError(f"stdit3 size must be one of {STDIT3_SIZES}, got {stdit3_size!r}")
        d = write_random_checkpoints(root, which=("stdit3",), size=size, seed=SEED,
                                     overrides={"stdit3": over} if over else None)["stdit3"]
        cfg = json.loads((d / "config.json").read_text())
        label = "smoke" if quick else ("XL/2" if stdit3_size == "xl" else "mid")
        return {"name": name, "dir": str(d), "bytes": _checkpoint_bytes(d),
                "title": f"STDiT3 {label} (depth {cfg['depth']}, hidden {cfg['hidden_size']})",
                **(STDIT3_VIDEO_QUICK if quick else STDIT3_VIDEO)}
    raise ValueError(f"unknown workload {name!r}; expected one of {WORKLOADS}")


def _checkpoint_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def checkpoint_files(spec: dict[str, Any]) -> list[Path]:
    """The safetensors files of the workload's checkpoint (what blockrt and transformers' disk map read)."""
    return sorted(Path(spec["dir"]).glob("*.safetensors"))


def model_class(spec: dict[str, Any]) -> type:
    if spec["name"] == "t5":
        from transformers import T5EncoderModel
        return T5EncoderModel
    from blockrt.pipelines.opensora.stdit3 import STDiT3
    return STDiT3


def block_classes(spec: dict[str, Any]) -> list[str]:
    """Module classes accelerate must not split across devices (a block, and modules whose own parameters
    its device-map inference would otherwise drop)."""
    if spec["name"] == "t5":
        return ["T5Block"]
    return ["STDiT3Block", "CaptionEmbedder", "T2IFinalLayer"]


def build_resident(spec: dict[str, Any]) -> torch.nn.Module:
    """The whole model in memory, read from the checkpoint (for T5 the way users do: ``from_pretrained``)."""
    if spec["name"] == "t5":
        from transformers import T5EncoderModel
        return T5EncoderModel.from_pretrained(spec["dir"]).eval()
    from blockrt.pipelines.opensora.loading import load_stdit3
    return load_stdit3(spec["dir"], meta=False).model.eval()


def build_empty(spec: dict[str, Any]) -> torch.nn.Module:
    """The model with its weights on ``meta`` under accelerate's ``init_empty_weights`` (for dispatching)."""
    from accelerate import init_empty_weights

    cls = model_class(spec)
    if spec["name"] == "t5":
        from transformers import T5Config
        with init_empty_weights():
            return cls(T5Config.from_pretrained(spec["dir"])).eval()
    from blockrt.pipelines.opensora.stdit3 import STDiT3Config
    with init_empty_weights():
        return cls(STDiT3Config.from_dict(json.loads((Path(spec["dir"]) / "config.json").read_text()))).eval()


def diffusers_block_modules(spec: dict[str, Any]) -> list[str] | None:
    """``block_modules`` for diffusers' block-level group offloading: T5's blocks sit in ``encoder.block``, one
    level down (without it the whole T5 becomes one group); STDiT3's ModuleLists are top-level children."""
    return ["encoder"] if spec["name"] == "t5" else None


def run_passes(spec: dict[str, Any], call: Callable[..., torch.Tensor], n_passes: int,
               before_pass: Callable[[int], None], device: str = "cpu") -> tuple[torch.Tensor, list[float], bool]:
    """Run ``n_passes`` passes of the workload through ``call`` (the contender's model or runtime).

    ``before_pass(i)`` runs before pass ``i`` and is not timed (dropping the page cache in the cold regime).
    Returns the final output on CPU (T5: the last pass's ``last_hidden_state`` ``(1, tokens, d_model)``;
    STDiT3: the final latent ``(1, 4, T, h, w)`` after ``n_passes`` denoising steps), each pass's wall time,
    and whether every T5 pass gave the same output (always True for STDiT3, whose passes differ by design).
    """
    walls: list[float] = []
    from time import perf_counter

    def timed(i: int, *args: Any, **kwargs: Any) -> Any:
        before_pass(i)
        t0 = perf_counter()
        out = call(*args, **kwargs)
        walls.append(perf_counter() - t0)
        return out

    with torch.no_grad():
        if spec["name"] == "t5":
            g = torch.Generator().manual_seed(SEED + 1)
            ids = torch.randint(0, spec["vocab"], (1, spec["tokens"]), generator=g).to(device)  # (1, tokens)
            outs = [timed(i, input_ids=ids).last_hidden_state.cpu() for i in range(n_passes)]  # (1, tokens, d)
            same = all(torch.equal(o, outs[-1]) for o in outs)
            return outs[-1], walls, same
        return _denoise(spec, timed, n_passes, device), walls, True


def _denoise(spec: dict[str, Any], timed: Callable[..., Any], steps: int, device: str) -> torch.Tensor:
    from safetensors import safe_open

    from blockrt.pipelines.opensora.loading import find_weights
    from blockrt.pipelines.opensora.resolution import latent_size
    from blockrt.pipelines.opensora.sampler import initial_noise, sample, timesteps

    cfg = json.loads((Path(spec["dir"]) / "config.json").read_text())
    with safe_open(str(find_weights(spec["dir"])), "pt") as f:  # the learned null caption, as null_caption() gives it
        null = f.get_tensor("y_embedder.y_embedding")[None, None]  # (1, 1, L, Cc)
    g = torch.Generator().manual_seed(SEED + 2)
    y = torch.randn(1, 1, cfg["model_max_length"], cfg["caption_channels"], generator=g)  # (1, 1, L, Cc) "T5 output"
    mask = torch.zeros(1, cfg["model_max_length"], dtype=torch.long)
    mask[:, : spec["prompt_tokens"]] = 1
    y_in = torch.cat([y, null]).to(device)  # cond row first, then the null caption (as the pipeline)
    mask = mask.to(device)
    h, w, frames = spec["height"], spec["width"], spec["frames"]
    lt, lh, lw = latent_size(frames, h, w)
    ts = timesteps(steps, height=h, width=w, num_frames=frames)
    z = initial_noise((1, cfg["in_channels"], lt, lh, lw), SEED + 3)  # (1, 4, T, h, w) bf16, as Open-Sora draws it
    side = {"fps": torch.tensor([float(spec["fps"])], device=device), "height": torch.tensor([float(h)], device=device),
            "width": torch.tensor([float(w)], device=device)}

    def model_fn(z_in: torch.Tensor, t_in: torch.Tensor, step: int, x_mask: torch.Tensor | None) -> torch.Tensor:
        # as the pipeline: x cast to the weights' dtype first, so every step is one input kind
        out = timed(step, z_in.to(device=device, dtype=torch.float32), t_in.to(device), y_in, mask=mask,
                    x_mask=x_mask, **side)
        return out.cpu()

    return sample(model_fn, z, ts, cfg_scale=spec["cfg_scale"]).z
