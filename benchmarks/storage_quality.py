"""The cost and the gain of storing blocks narrower: quality against float32, and bytes and load time per pass.

For each storage dtype (``float32`` = the reference, ``float16``, ``bfloat16``, ``int8`` weight-only with
per-output-channel scales, ``int4`` weight-only with a scale per group of 128 and ``int4-g64``), two models stream from a float32 checkpoint, converted once into a store of
that dtype by blockrt (``RunConfig(storage_dtype=...)``; the conversion time is printed):

- **T5 encoder**: ``transformers.T5EncoderModel`` with the DeepFloyd T5-v1.1-XXL architecture at its real
  width (d_model 4096, 64 heads of 64, d_ff 10240, gated-gelu, vocab 32128) but ``--t5-layers`` of its 24
  layers (default 2: the full 24 would be 19 GB and minutes per pass here), random weights in transformers'
  own init scale (``T5PreTrainedModel._init_weights``, seeded), on 8 fixed prompts tokenised with
  ``pipelines/opensora/t5.py`` (a SentencePiece model trained on the prompts; padded to ``--tokens``: the
  valid tokens' embeddings do not depend on the padding length, which is masked). Measured over the valid
  tokens: cosine similarity (per token: mean and min; and of the whole embedding) and max abs error against
  float32, and the SNR in dB.
- **STDiT3**: one denoising forward (the CFG batch: the prompt's T5 embedding, zero-padded to 300 tokens as
  Open-Sora feeds it, and the null caption) on a fixed 144p 17-frame latent (4 x 5 x 18 x 32) at timestep
  900, STDiT3 at the real width (1152, 16 heads) with ``--stdit3-depth`` of its 28 block pairs (default 4),
  random weights in the real checkpoint layout (``pipelines/opensora/random_weights.py``). Measured on the
  velocity (the first 4 output channels): cosine similarity, max abs error, SNR.

Loads are throttled to the iPhone 15 Pro's flash (``IPHONE15PRO``: 1.45 GB/s, budget ``iphone15pro``,
retention off so every pass streams every block); per pass: ``bytes_loaded`` (as stored) and ``load_s``,
and their ratio to float32, while the model computes and with the loader alone (every block loaded once more
after the run, nothing computing: on a small shared machine compute and other processes slow the loader's
reads and widening). Widening on its own: ``widen GB/s`` (compute-dtype bytes the loader's in-place widening
produces per second, on one thread, the stored bytes already in memory) beside ``read GB/s`` (the store's block
files read from the page cache with ``preadv`` into one buffer): widening must stay faster than reading, or it is
the bottleneck. T5 also runs unthrottled from the page cache ("warm"), where the loader's widening
(int8 -> float32 in place) is not hidden behind the throttle.

    .venv/bin/python benchmarks/storage_quality.py           # ~5-10 min on 2 cores, ~8 GB of temporary disk
    .venv/bin/python benchmarks/storage_quality.py --quick   # tiny configs, seconds (the smoke run)

Writes ``results.json`` and ``results.csv`` to ``--out`` (default ``out/bench/storage``); the checkpoints
and converted stores go to ``--work`` (default ``<out>/work``) and are removed afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

import blockrt
from blockrt import RunConfig
from blockrt.device import IPHONE15PRO
from blockrt.partitioners import partition
from bench_common import OtherCpu, hardware, release_freed_memory, write_results

DTYPES = ("float32", "float16", "bfloat16", "int8", "int4", "int4-g64")
PROMPTS = (
    "a red fox running through fresh snow in a pine forest, morning light",
    "aerial view of waves breaking on a rocky coastline at sunset",
    "a chef slicing vegetables on a wooden board, close up, shallow depth of field",
    "timelapse of clouds moving over a mountain lake",
    "a cat sleeping on a windowsill while rain falls outside",
    "city street at night with neon signs reflected in puddles, people walking",
    "a hot air balloon rising slowly over green hills",
    "macro shot of a bee collecting pollen from a sunflower",
)
STDIT3_LATENT = (4, 5, 18, 32)  # (C, T, H, W): 144p (256x144 -> 32x18), 17 frames -> 5 latent frames
TIMESTEP = 900.0
FIELDS = ("model", "storage_dtype", "regime", "cos_mean", "cos_min", "cos_all", "max_abs_err", "ref_max_abs", "snr_db",
          "bytes_loaded_per_pass", "bytes_ratio", "load_s_per_pass", "load_ratio", "load_alone_s_per_pass",
          "load_alone_ratio", "wall_s_per_pass", "roofline_ratio", "store_bytes", "convert_s", "peak_ledger_bytes",
          "budget", "widen_gbps", "read_gbps")


def compare(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Quality of ``out`` against ``ref`` (both (n, d) rows: tokens or positions)."""
    ref, out = ref.double(), out.double()
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)  # (n,)
    noise = ((out - ref) ** 2).sum().item()
    return {"cos_mean": cos.mean().item(), "cos_min": cos.min().item(),
            "cos_all": torch.nn.functional.cosine_similarity(out.reshape(1, -1), ref.reshape(1, -1)).item(),
            "max_abs_err": (out - ref).abs().max().item(), "ref_max_abs": ref.abs().max().item(),
            "snr_db": math.inf if noise == 0 else 10 * math.log10((ref ** 2).sum().item() / noise)}


def save_checkpoint(model: torch.nn.Module, directory: Path) -> Path:
    """The model's owned tensors (tied ones once) as ``model.safetensors``, written atomically."""
    from blockrt.safetensors_format import write_file

    directory.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    tmp = directory / ".model.safetensors.tmp"
    write_file(tmp, {k: sd[k].contiguous() for k in partition(model).all_specs()})
    tmp.rename(directory / "model.safetensors")
    return directory


def store_bytes(rt: blockrt.Runtime) -> int:
    """Bytes of the block files the runtime streams from."""
    return sum(Path(p).stat().st_size for p in rt.weight_files if "pinned" not in Path(p).name) \
        if isinstance(rt._source, blockrt.store.StoreSource) else \
        sum(seg.nbytes for b in rt.plan.blocks for seg in (rt._source.segment(k) for k in b.keys))


def stream(build, weights: Path, dtype: str, call, passes: int, throttled: bool) -> tuple[Any, dict[str, Any]]:
    """Build a skeleton, stream it from ``weights`` stored as ``dtype``; return (first output, figures)."""
    with blockrt.meta_weights():
        skeleton = build()
    conf = RunConfig(storage_dtype=None if dtype == "float32" else dtype, retention=False,
                     read_bytes_per_s=IPHONE15PRO.read_bytes_per_s if throttled else None)
    t0 = time.perf_counter()
    with blockrt.run(skeleton, budget="iphone15pro", weights=weights, config=conf) as rt:
        convert_s = time.perf_counter() - t0
        first = None
        for p in range(passes):
            out = call(skeleton, rt)
            first = out if first is None else first
        last = rt.profile.summary(passes=[passes - 1])
        total = rt.profile.summary()
        fig = {"bytes_loaded_per_pass": last.bytes_loaded, "load_s_per_pass": last.load_s,
               "wall_s_per_pass": last.wall_s, "roofline_ratio": last.roofline_ratio, "store_bytes": store_bytes(rt),
               "convert_s": convert_s, "peak_ledger_bytes": total.peak_ledger_bytes, "budget": rt.budget}
    if total.peak_ledger_bytes > rt.budget:
        raise blockrt.BudgetError(f"peak ledger {total.peak_ledger_bytes} passed the budget {rt.budget}")
    del skeleton
    release_freed_memory()
    fig["load_alone_s_per_pass"] = loads_alone(rt._source, rt.plan,  # the runtime's own source, read by a bare loader
                                           conf.read_bytes_per_s)
    fig["widen_gbps"], fig["read_gbps"] = widen_and_read_rates(rt._source, rt.plan)
    release_freed_memory()
    return first, fig


def loads_alone(source, plan, read_bytes_per_s: float | None, rounds: int = 2) -> float:
    """Seconds the loader alone (nothing computing beside it) takes to load every block once, after a round
    that warms it up: the read (throttled or not) plus, for narrower storage, the widening into the slot."""
    from blockrt.loader import BlockLayout, Loader, LoadRequest, Slot, Staging
    from blockrt.profile import Profile

    layouts = [BlockLayout.of(b) for b in plan.blocks]
    staging = Staging.of(layouts, {k: source.segment(k).dtype for b in plan.blocks for k in b.keys})
    profile = Profile()
    slot = Slot(0, max(lay.nbytes for lay in layouts), torch.device("cpu"))
    loader = Loader(source, profile, torch.device("cpu"), read_bytes_per_s=read_bytes_per_s,
                    slot_bytes=slot.buf.numel(), staging=staging)
    try:
        for r in range(rounds):
            for i, lay in enumerate(layouts):
                req = LoadRequest(i, lay, slot, r, verify=False)
                loader.submit(req)
                loader.wait(req, 600.0)
    finally:
        loader.close()
    return sum(e.end - e.start for e in profile.events if e.kind == "load" and e.pass_idx == rounds - 1)


def widen_and_read_rates(source, plan) -> tuple[float, float]:
    """(GB/s of compute-dtype output the loader's widening produces on this thread, the stored bytes already in
    memory; NaN when nothing is stored narrower) and (GB/s of reading the block files from the page cache)."""
    import os

    from blockrt.partitioners.plan import dtype_from_name
    from blockrt.quantize import convert_in_place, scale_key, tmp_elements

    specs = [t for b in plan.blocks for t in b.tensors if source.segment(t.key).dtype != t.dtype]
    produced, secs = 0, 0.0
    if specs:
        tmp = torch.empty(max(tmp_elements(t, source.segment(t.key).dtype) for t in specs), dtype=torch.float32)
        for t in specs:
            seg = source.segment(t.key)
            region = torch.empty(t.nbytes, dtype=torch.uint8)
            raw = source.read_tensor(t.key)  # as stored (int4: the packed bytes)
            flat = raw.reshape(-1).view(torch.uint8)
            scale = source.read_tensor(scale_key(t.key)).reshape(-1) if scale_key(t.key) in source.segments else None
            for _ in range(2):  # the second round is timed (pages faulted in by the first)
                region[t.nbytes - flat.numel():] = flat
                t0 = time.perf_counter()
                convert_in_place(region, t, seg.dtype, scale, tmp)
                dt = time.perf_counter() - t0
            produced += t.nbytes
            secs += dt
            del region, raw, flat
    files = sorted({source.segment(t.key).path for b in plan.blocks for t in b.tensors})
    buf = bytearray(64 << 20)
    total, t0 = 0, 0.0
    for r in range(2):  # the first round warms the page cache; the second is timed
        total, t0 = 0, time.perf_counter()
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                while n := os.readv(fd, [buf]):
                    total += n
            finally:
                os.close(fd)
    read_s = time.perf_counter() - t0
    return (produced / secs / 1e9 if secs else math.nan), (total / read_s / 1e9 if read_s else math.nan)


def t5_part(args, work: Path) -> tuple[list[dict[str, Any]], torch.Tensor, torch.Tensor, str]:
    from transformers import T5EncoderModel

    from blockrt.pipelines.opensora.t5 import XXL_CONFIG_JSON, load_tokenizer, t5_tiny_config, tokenize, train_tiny_tokenizer

    if args.quick:
        config = t5_tiny_config(vocab_size=32128)
        what = "T5 (tiny: d_model 64, 4 layers)"
    else:
        xxl = {k: XXL_CONFIG_JSON[k] for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads")}
        config = t5_tiny_config(**xxl, num_layers=args.t5_layers, num_decoder_layers=args.t5_layers)
        what = f"T5-v1.1-XXL width (d_model 4096, d_ff 10240, 64 heads), {args.t5_layers} of 24 layers"
    tok = load_tokenizer(train_tiny_tokenizer(list(PROMPTS) * 4, work / "tokenizer", vocab_size=200))
    ids, mask = tokenize(tok, PROMPTS, max_length=args.tokens)  # (8, tokens) each
    torch.manual_seed(0)
    model = T5EncoderModel(config).eval()  # transformers' own init: T5PreTrainedModel._init_weights
    ckpt = save_checkpoint(model, work / "t5")
    del model
    release_freed_memory()

    def build():
        return T5EncoderModel(config).eval()

    def call(skeleton, rt):
        return rt(input_ids=ids, attention_mask=mask).last_hidden_state.clone()  # (8, tokens, d_model)

    rows, outs = [], {}
    for regime, throttled in (("iphone", True), ("warm", False)):
        for dtype in DTYPES:
            out, fig = stream(build, ckpt, dtype, call, args.passes, throttled)
            outs.setdefault(dtype, out)
            rows.append({"model": "t5", "storage_dtype": dtype, "regime": regime, **fig})
    valid = mask.bool()
    for r in rows:
        r.update(compare(outs["float32"][valid], outs[r["storage_dtype"]][valid]))
    return rows, outs["float32"], mask, what


def stdit3_part(args, work: Path, t5_ref: torch.Tensor, t5_mask: torch.Tensor) -> tuple[list[dict[str, Any]], str]:
    from blockrt.pipelines.opensora.random_weights import write_random_checkpoints
    from blockrt.pipelines.opensora.stdit3 import STDiT3, STDiT3Config

    size = "tiny" if args.quick else "full"
    overrides = {} if args.quick else {"stdit3": {"depth": args.stdit3_depth}}
    weights = write_random_checkpoints(work / "stdit3", which=("stdit3",), size=size, overrides=overrides)["stdit3"]
    cfg = STDiT3Config.from_dict(json.loads((weights / "config.json").read_text()))
    what = ("STDiT3 (tiny)" if args.quick else
            f"STDiT3 width 1152 (16 heads), {cfg.depth} of 28 block pairs") + f", {cfg.model_max_length} caption tokens"
    L, cap = cfg.model_max_length, cfg.caption_channels
    y = torch.zeros(1, 1, L, cap)  # (1, 1, L, Cc): the first prompt's T5 embedding, zero-padded as Open-Sora feeds it
    n = min(L, t5_ref.shape[1])
    width = min(cap, t5_ref.shape[2])
    y[0, 0, :n, :width] = t5_ref[0, :n, :width]
    ymask = torch.zeros(1, L, dtype=torch.long)
    ymask[0, :n] = t5_mask[0, :n]
    C, T, H, W = STDIT3_LATENT if not args.quick else (cfg.in_channels, 2, 6, 7)
    x = torch.randn(1, C, T, H, W, generator=torch.Generator().manual_seed(0))  # (1, C, T, H, W) latent noise
    side = {"fps": torch.tensor([24.0]), "height": torch.tensor([float(H * 8)]), "width": torch.tensor([float(W * 8)])}

    def build():
        return STDiT3(cfg).eval()

    def call(skeleton, rt):
        y_in = torch.cat([y, skeleton.null_caption(1)])  # cond row first, then the null caption
        out = rt(torch.cat([x, x]), torch.tensor([TIMESTEP, TIMESTEP]), y_in, mask=ymask, **side)
        return out[:, : cfg.in_channels].clone()  # (2, C, T, H, W): the velocity of both CFG rows

    rows, outs = [], {}
    for dtype in DTYPES:
        out, fig = stream(build, weights, dtype, call, args.passes, True)
        outs[dtype] = out
        rows.append({"model": "stdit3", "storage_dtype": dtype, "regime": "iphone", **fig})
    for r in rows:  # per position: the C velocity channels of each (row, t, h, w)
        per_pos = lambda v: v.permute(0, 2, 3, 4, 1).reshape(-1, v.shape[1])  # noqa: E731
        r.update(compare(per_pos(outs["float32"]), per_pos(outs[r["storage_dtype"]])))
    return rows, what


def ratios(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        ref = next(x for x in rows if x["model"] == r["model"] and x["regime"] == r["regime"]
                   and x["storage_dtype"] == "float32")
        r["bytes_ratio"] = r["bytes_loaded_per_pass"] / ref["bytes_loaded_per_pass"]
        r["load_ratio"] = r["load_s_per_pass"] / ref["load_s_per_pass"] if ref["load_s_per_pass"] else math.nan
        r["load_alone_ratio"] = r["load_alone_s_per_pass"] / ref["load_alone_s_per_pass"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/bench/storage")
    ap.add_argument("--work", default=None, help="checkpoints and stores (default <out>/work); removed unless --keep")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--t5-layers", type=int, default=2)
    ap.add_argument("--stdit3-depth", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per prompt (Open-Sora pads to 300; masked)")
    ap.add_argument("--passes", type=int, default=3, help="per run; figures from the last, quality from the first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny T5 and STDiT3 (the smoke run)")
    args = ap.parse_args(argv)
    if args.passes < 2:
        raise SystemExit("--passes must be at least 2 (the first pass also measures memory and verifies crc32)")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    busy = OtherCpu().start()
    t0 = time.perf_counter()
    try:
        t5_rows, t5_ref, t5_mask, t5_what = t5_part(args, work)
        st_rows, st_what = stdit3_part(args, work, t5_ref, t5_mask)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    rows = t5_rows + st_rows
    ratios(rows)
    hw = hardware()
    other = busy.cores()
    print(f"storage dtypes: {hw['cpu']}, {hw['cores']} cores, {hw['torch_threads']} torch threads; other processes "
          f"used {other:.2f} cores on average (timings are noisy above 0.2); {time.perf_counter() - t0:.0f} s")
    print(f"  {t5_what}; {len(PROMPTS)} prompts of {args.tokens} tokens")
    print(f"  {st_what}; one CFG forward at t={TIMESTEP:g} on a latent {STDIT3_LATENT if not args.quick else 'tiny'}")
    print(f"  iphone = budget iphone15pro, loads throttled to {IPHONE15PRO.read_bytes_per_s / 1e9:.2f} GB/s; "
          "warm = page cache, unthrottled; retention off; per-pass figures from the last of each run's passes; "
          "'load' and 'alone' = load_s per pass / float32's, while computing and with the loader alone")
    print(f"{'model':<7} {'dtype':<9} {'regime':<7} {'cos mean':>9} {'cos min':>9} {'max abs':>9} {'(ref max)':>9} "
          f"{'SNR dB':>7} {'MB/pass':>8} {'bytes':>6} {'load s':>7} {'load':>6} {'alone s':>7} {'alone':>6} "
          f"{'wall s':>7} {'convert s':>9} {'widen GB/s':>10} {'read GB/s':>9}")
    for r in rows:
        print(f"{r['model']:<7} {r['storage_dtype']:<9} {r['regime']:<7} {r['cos_mean']:9.6f} {r['cos_min']:9.6f} "
              f"{r['max_abs_err']:9.2e} {r['ref_max_abs']:9.2e} {r['snr_db']:7.1f} "
              f"{r['bytes_loaded_per_pass'] / 1e6:8.1f} {r['bytes_ratio']:6.3f} {r['load_s_per_pass']:7.3f} "
              f"{r['load_ratio']:6.3f} {r['load_alone_s_per_pass']:7.3f} {r['load_alone_ratio']:6.3f} "
              f"{r['wall_s_per_pass']:7.3f} {r['convert_s']:9.1f} {r['widen_gbps']:10.2f} {r['read_gbps']:9.2f}")
    results = {"hardware": hw, "other_cpu_cores": other, "t5": t5_what, "stdit3": st_what, "prompts": list(PROMPTS),
               "tokens": args.tokens, "read_bytes_per_s": IPHONE15PRO.read_bytes_per_s, "rows": rows}
    write_results(out, results, rows, FIELDS)
    print(f"wrote {out / 'results.json'} and {out / 'results.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
