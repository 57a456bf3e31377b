"""A Flux-dev-sized transformer on a GPU under a third of its bytes: blockrt against the resident model and
diffusers' streamed group offloading (issue 16, item 4; run by ``benchmarks/gpu_check.sh``).

``FluxTransformer2DModel`` with the FLUX.1-dev config (19 double and 38 single blocks, 24 heads of 128, joint
attention 4096, guidance embedding; 11.9 B parameters, ~23.8 GB bf16) is built on ``meta`` and materialised
in host memory with random bf16 weights (a 64M-element random vector copied at random offsets: seconds, not
the minutes a real init takes; norms 1). One step = one transformer call at 1024x1024 (4096 image tokens of 64
channels, 512 text tokens), batch 1. Rows, each after one warm-up step, ``--steps`` timed steps:

    resident     the model on the GPU (the reference output and time)
    blockrt      ``blockrt.run(model, budget=bytes/3, RunConfig(device="cuda"))``: blocks from the store it
                 spills to (host page cache), prefetch 1 on a side stream, retention under the budget
    diffusers    ``apply_group_offloading(block_level, 1 block per group, use_stream=True)`` from pinned host memory

Printed and written to ``--out`` (``flux.json``): seconds per step, the ratio to the resident (target <= 1.10),
diffusers' time over blockrt's (target >= 1.2), ``torch.cuda.max_memory_allocated`` per row, and the max abs
difference of each output from the resident's. ``--dry-run`` builds a tiny Flux on the CPU (no GPU needed), to
prove the script runs end to end. A row that fails is recorded with its error; the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))
TARGET_VS_RESIDENT = 1.10
TARGET_VS_DIFFUSERS = 1.2


def build(config: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """The transformer in host memory with random weights (std 0.02, norms 1), fast."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    model = model.to(dtype=dtype).to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    n = max(p.numel() for p in model.parameters())
    base = (torch.randn(2 * n, generator=g) * 0.02).to(dtype)  # (2n,): each tensor a random window of it
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                off = int(torch.randint(0, n, (1,), generator=g))
                p.view(-1).copy_(base[off: off + p.numel()])
        for b in model.buffers():
            b.zero_()
    return model


def inputs(config: dict[str, Any], tokens: int, text: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """One step's inputs: latents (1, tokens, C), text (1, text, D), pooled (1, P), timestep, ids, guidance."""
    g = torch.Generator().manual_seed(1)
    side = int(tokens ** 0.5)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    out = {"hidden_states": torch.randn(1, tokens, config["in_channels"], generator=g),
           "encoder_hidden_states": torch.randn(1, text, config["joint_attention_dim"], generator=g),
           "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=g),
           "timestep": torch.tensor([0.5]), "img_ids": img_ids.reshape(-1, 3), "txt_ids": torch.zeros(text, 3),
           "guidance": torch.tensor([3.5])}
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v.dtype)
            for k, v in out.items()}


def timed(call, args: dict[str, torch.Tensor], steps: int, device: str) -> tuple[torch.Tensor, list[float], int]:
    """(the last output on CPU, each timed step's seconds, peak device memory) after one warm-up step."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    walls = []
    with torch.no_grad():
        for i in range(steps + 1):
            t0 = time.perf_counter()
            out = call(**args, return_dict=False)[0]
            if cuda:
                torch.cuda.synchronize()
            if i:
                walls.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    return out.float().cpu(), walls, peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out/gpu") + "/flux")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--store", default=None, help="where blockrt spills the model's blocks (default <out>/store)")
    ap.add_argument("--rows", default="resident,blockrt,diffusers")
    ap.add_argument("--dry-run", action="store_true", help="a tiny Flux on the CPU: proves the script runs")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run or not torch.cuda.is_available()
    device = "cpu" if dry else "cuda"
    config, dtype = (FLUX_TINY, torch.float32) if dry else (FLUX_DEV, torch.bfloat16)
    tokens, text = (16, 8) if dry else (4096, 512)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if not dry else "cpu (dry run)",
                           "config": config, "dtype": str(dtype), "tokens": tokens, "text_tokens": text, "rows": {}}
    t0 = time.perf_counter()
    model = build(config, dtype)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    res.update(bytes=nbytes, build_s=time.perf_counter() - t0)
    print(f"flux: {nbytes / 1e9:.2f} GB {dtype} built in {res['build_s']:.0f} s on {res['device']}", flush=True)
    args_dev = inputs(config, tokens, text, dtype, device)
    ref = None

    def record(name: str, fn) -> None:
        nonlocal ref
        t1 = time.perf_counter()
        try:
            o, walls, peak, extra = fn()
            row = {"s_per_step": min(walls), "walls": walls, "peak_gpu_bytes": peak, **extra}
            if ref is None and name == "resident":
                ref = o
            if ref is not None:
                row["max_abs_vs_resident"] = float((o - ref).abs().max())
        except Exception as e:  # noqa: BLE001 - one row failing must not stop the others
            row = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=5)}
        row["wall_s"] = time.perf_counter() - t1
        res["rows"][name] = row
        print(f"  {name}: {json.dumps({k: v for k, v in row.items() if k != 'traceback'})}", flush=True)
        (out / "flux.json").write_text(json.dumps(res, indent=1))

    rows = args.rows.split(",")
    if "resident" in rows:
        def resident():
            model.to(device)
            try:
                return (*timed(model, args_dev, args.steps, device), {})
            finally:
                model.to("cpu")
                if not dry:
                    torch.cuda.empty_cache()
        record("resident", resident)
    if "blockrt" in rows:
        def streamed():
            import blockrt
            from blockrt import RunConfig
            budget = nbytes // 3 if not dry else max(nbytes // 3, 4 << 20)
            with blockrt.run(model, budget=budget, store=store,
                             config=RunConfig(device=device)) as rt:
                o, walls, peak = timed(rt, args_dev, args.steps, device)
                extra = {"budget": budget, "peak_ledger": rt.ledger.peak, "blocks": len(rt.plan.blocks),
                         "retained": len(rt.retention.retained) if rt.retention else 0,
                         "profile": str(rt.profile.summary(passes=range(1, args.steps + 1)))}
            return o, walls, peak, extra
        store = Path(args.store) if args.store else out / "store"
        record("blockrt", streamed)
        import shutil
        shutil.rmtree(store, ignore_errors=True)
    if "diffusers" in rows:
        def diffusers_stream():
            from diffusers.hooks import apply_group_offloading
            apply_group_offloading(model, onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1, use_stream=not dry)
            return (*timed(model, args_dev, args.steps, device), {"use_stream": not dry})
        record("diffusers", diffusers_stream)
    r = res["rows"]
    s = {k: v.get("s_per_step") for k, v in r.items()}
    if s.get("blockrt") and s.get("resident"):
        res["blockrt_vs_resident"] = s["blockrt"] / s["resident"]
    if s.get("blockrt") and s.get("diffusers"):
        res["diffusers_over_blockrt"] = s["diffusers"] / s["blockrt"]
    print(f"flux: blockrt / resident = {res.get('blockrt_vs_resident', float('nan')):.3f} (target <= "
          f"{TARGET_VS_RESIDENT}); diffusers streamed / blockrt = {res.get('diffusers_over_blockrt', float('nan')):.3f} "
          f"(target >= {TARGET_VS_DIFFUSERS}); peak GPU bytes "
          + ", ".join(f"{k} {v.get('peak_gpu_bytes', 0) / 1e9:.2f} GB" for k, v in r.items()), flush=True)
    tmp = out / ".flux.json.tmp"
    tmp.write_text(json.dumps(res, indent=1))
    tmp.rename(out / "flux.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
