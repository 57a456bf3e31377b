"""What blockrt's integrity checks cost (issue 14): opening stores and checkpoints, warm page cache.

A toy transformer of about ``--mb`` MB (float32) is spilled to a store and saved as a safetensors checkpoint,
then timed (median of ``--repeats``) through the public API only, so the same script measures any blockrt
version (``PYTHONPATH=<other checkout>`` to compare):

    content hash       the content fingerprint of the model in memory alone (GB/s; this version only)
    spill              ``blockrt.run(model, store=new)``: writes the store (hashing what it writes)
    reopen store=      ``blockrt.run(model, store=existing)``: reuse check (full content hash of the model,
                       header layouts, pinned crc32)
    open weights=      ``blockrt.run(skeleton, weights=store)``: header layouts and pinned crc32
    first pass         one forward pass streaming every block (crc32 of each block on its first load), with
                       ``verify="first"`` and ``verify="never"``
    convert            ``storage_dtype="float16"`` from the checkpoint: converted once (hashing it while reading)
    reopen converted   the same again: the checkpoint's identity is unchanged, no hashing
    reopen touched     after ``os.utime`` on the checkpoint (same bytes, new times): hashed again, reused

    .venv/bin/python benchmarks/integrity_cost.py              # ~500 MB, ~1 min on the 2-core dev machine
    .venv/bin/python benchmarks/integrity_cost.py --mb 50      # quick
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

import blockrt  # noqa: E402
from blockrt.partitioners import partition  # noqa: E402
from blockrt.pipelines.toy import ToyConfig, ToyTransformer  # noqa: E402

BUDGET = "4GB"


def build(mb: int, vocab: int, meta: bool = False) -> ToyTransformer:
    """About ``mb`` MB of float32 layers (12 d^2 weights each) plus a ``vocab`` x 1024 tied embedding (pinned)."""
    dim = 1024
    layers = max(2, round((mb * 2**20 - vocab * dim * 4) / (12 * dim * dim * 4)))
    torch.manual_seed(0)
    cfg = ToyConfig(vocab=vocab, dim=dim, n_layers=layers, n_heads=16, max_len=64)
    if meta:
        with blockrt.meta_weights():
            return ToyTransformer(cfg).eval()
    return ToyTransformer(cfg).eval()


def timed(fn, repeats: int, setup=lambda: None) -> float:
    """Median seconds of ``fn(setup())``, ``setup`` untimed."""
    times = []
    for _ in range(repeats):
        arg = setup()
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ckpt_bytes(src) -> int:
    return sum(seg.nbytes for seg in src.segments.values())


def parts(store: Path, repeats: int, rows: list[tuple[str, str]]) -> None:
    """The checks alone, where this version has them: header layouts of every file, the pinned file's crc32."""
    try:
        from blockrt.integrity import data_crc32
        from blockrt.safetensors_format import read_layout
        from blockrt.store import StoreSource, read_manifest
    except ImportError:
        return
    manifest = read_manifest(store)
    s = timed(lambda _: StoreSource(store, manifest, verify=False), repeats)
    rows.append(("  of which: check every header", f"{s * 1e3:.1f} ms ({len(manifest['files']['blocks']) + 1} files)"))
    h = read_layout(store / "pinned.safetensors")
    s = timed(lambda _: data_crc32(str(store / "pinned.safetensors"), h.data_start, h.size), repeats)
    n = h.size - h.data_start
    rows.append(("  of which: pinned crc32", f"{s * 1e3:.1f} ms ({n / 1e6:.0f} MB, {n / s / 1e9:.2f} GB/s)"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=500, help="model size in MB (float32)")
    ap.add_argument("--vocab", type=int, default=32128, help="embedding rows (T5's 32128: a 131 MB pinned table)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = blockrt.RunConfig(retention=False)
    ids = torch.zeros(1, 8, dtype=torch.long)
    model = build(args.mb, args.vocab)  # for the sizes and the hash only
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows: list[tuple[str, str]] = []
    pinned = partition(model).pinned_bytes
    print(f"blockrt {blockrt.__file__}\nmodel {nbytes / 1e6:.0f} MB float32 ({pinned / 1e6:.0f} MB pinned), "
          f"{platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}; median of {args.repeats}, warm page cache")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        try:
            from blockrt.integrity import fingerprint

            plan = partition(model)
            sd = model.state_dict()
            s = timed(lambda _: fingerprint(sorted(plan.all_specs()), sd.__getitem__), args.repeats)
            rows.append(("content hash", f"{s:.3f} s ({nbytes / s / 1e9:.2f} GB/s)"))
        except ImportError:
            rows.append(("content hash", "n/a (this version samples)"))

        def fresh() -> ToyTransformer:  # a new store each time (the spill writes it)
            shutil.rmtree(d / "s", ignore_errors=True)
            return build(args.mb, args.vocab)

        def spill(m: ToyTransformer) -> None:
            blockrt.run(m, budget=BUDGET, store=d / "s", config=cfg).close()

        rows.append(("spill", f"{timed(spill, args.repeats, fresh):.3f} s"))
        rows.append(("reopen store=", f"{timed(spill, args.repeats, lambda: build(args.mb, args.vocab)):.3f} s"))
        for verify in ("first", "never"):
            c = blockrt.RunConfig(retention=False, verify=verify)
            opens, passes = [], []
            for _ in range(args.repeats):
                skeleton = build(args.mb, args.vocab, meta=True)
                t0 = time.perf_counter()
                rt = blockrt.run(skeleton, budget=BUDGET, weights=d / "s", config=c)
                t1 = time.perf_counter()
                with torch.no_grad():
                    rt(ids=ids)
                passes.append(time.perf_counter() - t1)
                opens.append(t1 - t0)
                rt.close()
            rows.append((f"open weights= (verify={verify})", f"{statistics.median(opens):.3f} s"))
            rows.append((f"first pass (verify={verify})", f"{statistics.median(passes):.3f} s "
                         f"({nbytes / statistics.median(passes) / 1e9:.2f} GB/s incl. compute)"))
        parts(d / "s", args.repeats, rows)
        from safetensors.torch import save_file

        ckpt = d / "ckpt"
        ckpt.mkdir()
        os.environ["BLOCKRT_CACHE"] = str(d / "cache")  # the converted stores, in this run's temporary directory
        owned = partition(model).all_specs()  # tied tensors once
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k in owned}, ckpt / "model.safetensors")
        half = blockrt.RunConfig(retention=False, storage_dtype="float16")

        def stream(skeleton: ToyTransformer) -> None:
            blockrt.run(skeleton, budget=BUDGET, weights=ckpt, config=half).close()

        def skeleton(clear: bool = False, touch: bool = False):
            def setup() -> ToyTransformer:
                if clear:
                    shutil.rmtree(d / "cache", ignore_errors=True)
                if touch:
                    os.utime(ckpt / "model.safetensors")
                return build(args.mb, args.vocab, meta=True)
            return setup

        rows.append(("convert to float16", f"{timed(stream, args.repeats, skeleton(clear=True)):.3f} s"))
        rows.append(("reopen converted", f"{timed(stream, args.repeats, skeleton()):.3f} s"))
        rows.append(("reopen touched", f"{timed(stream, args.repeats, skeleton(touch=True)):.3f} s"))
        try:
            from blockrt.integrity import fingerprint
            from blockrt.sources import CheckpointSource

            src = CheckpointSource(ckpt)
            keys = sorted(src.segments)
            s = timed(lambda _: fingerprint(keys, src.read_tensor), args.repeats)
            rows.append(("  of which: hash the checkpoint", f"{s:.3f} s ({ckpt_bytes(src) / s / 1e9:.2f} GB/s)"))
        except ImportError:
            pass
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


if __name__ == "__main__":
    main()
