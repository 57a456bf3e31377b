"""CoreML export time and package size of ONE full-size block of each Open-Sora model, fp32 / fp16 / int8.

The blocks are built alone at their real sizes with random weights (no checkpoint is written): a T5-XXL
block (``T5NextBlock``, 300 tokens), an STDiT3-XL/2 layer (spatial + temporal block at 144p 3:4, 17 frames:
CFG batch 2 x 5 x 10 x 14 tokens) and the largest temporal-VAE part (``vae_temporal_stage_3``: four 512-wide
3-D res blocks + the time up-sampling conv, on one chunk of 5 x 20 x 27 latents). Each is exported with
``export_blocks`` three ways: fp32 compute, fp16 compute, fp16 + int8 weights. Printed and written to
``out/bench/coreml/results.{json,csv}``: seconds (trace, convert, quantize, total), bytes on disk, and bytes
relative to the block's fp32 weights. Conversion time is CPU-bound and noisy on a shared machine; bytes are not.

    .venv/bin/python benchmarks/coreml_export.py            # about 5-15 min on 2 cores, ~6 GB of memory
    .venv/bin/python benchmarks/coreml_export.py --quick    # tiny sizes: a smoke run
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from blockrt.coreml import ExportBlock, ExportOptions, export_blocks, inspect_package
from bench_common import BUSY_CORES, OtherCpu, hardware, release_freed_memory, write_results

ROOT = Path(__file__).resolve().parents[1]

MODES = {"fp32": ExportOptions(precision="fp32", check=False), "fp16": ExportOptions(precision="fp16", check=False),
         "int8": ExportOptions(precision="fp16", quantize="int8", check=False)}
FIELDS = ["block", "mode", "params", "fp32_weight_bytes", "package_bytes", "weight_bytes", "size_vs_fp32",
          "trace_s", "convert_s", "quantize_s", "total_s", "quantized_ops"]


def t5_block(quick: bool) -> ExportBlock:
    from transformers.models.t5.modeling_t5 import T5Block

    from blockrt.pipelines.opensora.coreml_t5 import NEXT_IO, T5NextBlock, additive_mask
    from blockrt.pipelines.opensora.t5 import t5_tiny_config, t5_xxl_config

    cfg = t5_tiny_config() if quick else t5_xxl_config()
    cfg._attn_implementation = "sdpa"  # what T5EncoderModel picks (a bare block would fall back to eager)
    block = T5Block(cfg, has_relative_attention_bias=False).eval()
    L = 300
    ex = (torch.randn(1, L, cfg.d_model), torch.randn(1, cfg.num_heads, L, L),
          additive_mask((torch.arange(L) < 20).long()[None]))  # hidden, position_bias, mask
    return ExportBlock("t5_block_01", T5NextBlock(block), ex, *NEXT_IO)


def stdit3_block(quick: bool) -> ExportBlock:
    from blockrt.pipelines.opensora.coreml_stdit3 import LAYER_IO, STDiT3Layer
    from blockrt.pipelines.opensora.stdit3 import STDiT3Block, STDiT3Config

    cfg = STDiT3Config.tiny() if quick else STDiT3Config.xl2()
    sp, tp = STDiT3Block(cfg, temporal=False).eval(), STDiT3Block(cfg, temporal=True).eval()
    T, S, C, L = 5, 10 * 14, cfg.hidden_size, cfg.model_max_length  # 144p 3:4 17 frames: latent 5 x 20 x 27
    ex = (torch.randn(2, T * S, C), torch.randn(2, L, C), torch.randn(2, 6 * C), torch.zeros(2, L),
          torch.randn(T, cfg.head_dim), torch.randn(T, cfg.head_dim))
    return ExportBlock("stdit3_block_00", STDiT3Layer(sp, tp, T, S), ex, *LAYER_IO)


def vae_block(quick: bool) -> ExportBlock:
    from blockrt.pipelines.opensora.coreml_vae import ResBlocks
    from blockrt.pipelines.opensora.vae_temporal import TemporalDecoder, TemporalVAEConfig

    cfg = TemporalVAEConfig(filters=8, num_groups=4) if quick else TemporalVAEConfig()
    dec = TemporalDecoder(cfg).eval()
    parts = {f"vae_temporal_stage_{i}": ResBlocks(dec.block_res_blocks[i], dec.conv_blocks[i - 1] if i else None,
                                                  bool(i) and bool(dec.temporal_upsample[i - 1]))
             for i in range(len(dec.block_res_blocks))}
    name = max(parts, key=lambda n: sum(p.numel() for p in parts[n].parameters()))  # the largest part
    x = torch.randn(1, cfg.filters * cfg.channel_multipliers[-1], 5, 20, 27)  # one chunk, 144p 3:4
    return ExportBlock(name, parts[name], (x,), ("x",), ("out",))


def measure(block: ExportBlock, mode: str, work: Path) -> dict[str, Any]:
    params = sum(p.numel() for p in block.module.parameters())
    out = work / f"{block.name}-{mode}"
    t0 = time.perf_counter()
    m = export_blocks([block], out, MODES[mode])
    wall = time.perf_counter() - t0
    p = m.packages[0]
    info = inspect_package(out / p.file)
    quantized = sum(v for k, v in info.op_counts.items() if k.startswith("constexpr"))
    shutil.rmtree(out)
    return {"block": block.name, "mode": mode, "params": params, "fp32_weight_bytes": params * 4,
            "package_bytes": p.bytes, "weight_bytes": p.weight_bytes, "size_vs_fp32": p.bytes / (params * 4),
            "trace_s": p.seconds.get("trace_s"), "convert_s": p.seconds.get("convert_s"),
            "quantize_s": p.seconds.get("quantize_s", 0.0), "total_s": wall, "quantized_ops": quantized}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'block':<22} {'mode':<5} {'params':>8} {'fp32 MB':>8} {'package MB':>10} {'vs fp32':>8} "
             f"{'convert s':>9} {'quant s':>8} {'total s':>8}"]
    for r in rows:
        lines.append(f"{r['block']:<22} {r['mode']:<5} {r['params'] / 1e6:>7.1f}M {r['fp32_weight_bytes'] / 1e6:>8.1f} "
                     f"{r['package_bytes'] / 1e6:>10.1f} {r['size_vs_fp32']:>8.3f} {r['convert_s']:>9.1f} "
                     f"{r['quantize_s']:>8.1f} {r['total_s']:>8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench" / "coreml"))
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated among fp32,fp16,int8")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = set(modes) - set(MODES)
    if bad:
        raise SystemExit(f"unknown modes {sorted(bad)}; expected among {list(MODES)}")
    torch.manual_seed(0)
    hw = hardware()
    print(f"{hw['cpu']}, {hw['cores']} cores, torch {hw['torch']}; one conversion at a time")
    other = OtherCpu().start()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="coreml-bench-") as tmp:
        for build in (t5_block, stdit3_block, vae_block):
            block = build(args.quick)
            for mode in modes:
                rows.append(measure(block, mode, Path(tmp)))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
            del block
            release_freed_memory()
    busy = other.cores()
    print()
    print(table(rows))
    note = (f"other processes used {busy:.1f} cores during the run: times are inflated, bytes are exact"
            if busy > BUSY_CORES else f"machine quiet (other processes {busy:.2f} cores)")
    print(note)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, {"hardware": hw, "quick": args.quick, "other_cpu_cores": busy, "rows": rows}, rows, FIELDS)
    print(f"wrote {out / 'results.json'} and {out / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
