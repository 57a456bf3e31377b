"""Decode-shaped matmuls: widen a stored int4/int8 weight and multiply, or multiply the packed weight (issue 16).

For each weight shape (out x in, Llama/TinyLlama's: attention 2048x2048, MLP up 5632x2048, MLP down 2048x5632,
LM head 32000x2048), random weights (seeded, scale 0.02) are stored as blockrt stores them (``int4-g<G>`` and
``int8``), then, for activations of ``--batches`` rows (1, 8, 64 tokens) in float32 and in bfloat16:

    matmul      ``x @ w.T`` with the dequantised weight already resident in the activations' dtype
    widen       the loader's in-place widening of the stored bytes into that dtype (``quantize.convert_in_place``,
                the stored bytes at the tail of the slot region, as ``loader.py`` does), with its output GB/s
    widen+mm    both, timed together: what streaming a widened weight costs per use
    packed      PyTorch's weight-only kernel on the stored bytes (``blockrt/packed_kernels.py``): int4 through
                ``_weight_int4pack_mm_for_cpu``, int8 through ``_weight_int8pack_mm``

Each figure is the best of ``--reps`` timed calls after one warm-up, on ``--threads`` torch threads (1: the
loader's one core). Ratios ``vs widen+mm`` and ``vs matmul`` are packed time over each (below 1: packed is
faster), measured in one run. After timing, every output is compared with the float32 matmul of the
dequantised weight on the float32 activations: max abs error and cosine (it raises below ``MIN_COS``).

    .venv/bin/python benchmarks/packed_matmul.py            # ~3 min on the 2-core dev machine
    .venv/bin/python benchmarks/packed_matmul.py --quick    # small shapes, seconds

Writes ``results.json`` and ``results.csv`` to ``--out`` (default ``out/bench/packed_matmul``).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from bench_common import BUSY_CORES, begin_run, write_results
from blockrt.partitioners.plan import TensorSpec

from blockrt import int4
from blockrt.packed_kernels import (
    int4_scales_and_zeros,
    int4_to_kernel,
    linear_int4,
    linear_int8,
)
from blockrt.quantize import (
    convert_in_place,
    dequantize_int8,
    quantize_int8,
    tmp_elements,
)

SHAPES = "2048x2048,5632x2048,2048x5632,32000x2048"  # (out, in): TinyLlama-1.1B's q/o, up/gate, down, LM head
QUICK_SHAPES = "256x256,512x256"
MIN_COS = 0.99  # any output this far from the reference means a wrong layout, not rounding
ACTS = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FIELDS = ("shape", "batch", "act", "format", "matmul_ms", "widen_ms", "widen_gbps", "widen_mm_ms", "packed_ms",
          "packed_vs_widen_mm", "packed_vs_matmul", "max_abs_err", "cos", "widen_mm_max_abs_err", "widen_mm_cos")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=SHAPES, help="comma-separated out x in")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--acts", default="float32,bfloat16", help="activation dtypes")
    p.add_argument("--group", type=int, default=int4.INT4_DEFAULT_GROUP, choices=int4.INT4_GROUPS)
    p.add_argument("--reps", type=int, default=5, help="timed calls after one warm-up (best kept)")
    p.add_argument("--max-s", type=float, default=2.0, help="stop timing one figure after this many seconds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help=f"--shapes {QUICK_SHAPES} --batches 1,8 --reps 2")
    p.add_argument("--out", default="out/bench/packed_matmul")
    a = p.parse_args(argv)
    if a.quick:
        a.shapes, a.batches, a.reps = QUICK_SHAPES, "1,8", 2
    a.shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",") if s]
    a.batches = [int(b) for b in a.batches.split(",") if b]
    a.acts = [x for x in a.acts.split(",") if x]
    if any(x not in ACTS for x in a.acts):
        p.error(f"--acts: expected among {tuple(ACTS)}; found {a.acts}")
    return a


def best_s(fn: Callable[[], Any], reps: int, max_s: float, setup: Callable[[], None] | None = None) -> float:
    """The fastest of ``reps`` timed calls of ``fn`` after one warm-up (``setup`` runs untimed before each)."""
    if setup:
        setup()
    fn()
    best, spent = float("inf"), 0.0
    for _ in range(reps):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > max_s:
            break
    return best


class Stored:
    """One weight as blockrt stores it (``fmt``: ``int4-g<G>`` or ``int8``) and what each path needs from it."""

    def __init__(self, w: torch.Tensor, fmt: str) -> None:
        n, k = w.shape
        self.fmt, self.group = fmt, int4.group_of(fmt)
        if self.group is not None:
            self.data, self.scale = int4.quantize_int4(w, self.group)  # uint8 (N, K/2), float32 (N, K/G)
            self.dequant = int4.dequantize_int4(self.data, self.scale, (n, k))  # float32 (N, K)
            self.kernel = int4_to_kernel(self.data)  # the int4 kernel's layout of the same nibbles
        else:
            self.data, self.scale = quantize_int8(w)  # int8 (N, K), float32 (N,)
            self.dequant = dequantize_int8(self.data, self.scale)
        self.stored_bytes = self.data.view(torch.uint8).reshape(-1)  # (stored bytes,)

    def packed_fn(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """The packed kernel's call on activations ``x`` (its scales cast to ``x``'s dtype once, outside timing)."""
        if self.group is not None:
            sz = int4_scales_and_zeros(self.scale, x.dtype)  # (K/G, N, 2)
            return lambda: linear_int4(x, self.kernel, self.group, sz)
        s = self.scale.to(x.dtype)
        return lambda: linear_int8(x, self.data, s)

    def slot(self, dtype: torch.dtype) -> tuple[TensorSpec, torch.Tensor, torch.Tensor, Callable[[], None]]:
        """A slot region for the weight in ``dtype``, the loader's chunk buffer, and a setup that puts the stored
        bytes at the region's tail (as the loader reads them) before each widening."""
        spec = TensorSpec("w", str(dtype).removeprefix("torch."), tuple(self.dequant.shape))
        region = torch.empty(spec.nbytes, dtype=torch.uint8)
        tmp = torch.empty(tmp_elements(spec, self.fmt), dtype=torch.float32)
        tail = region[region.numel() - self.stored_bytes.numel():]
        return spec, region, tmp, lambda: tail.copy_(self.stored_bytes)

    def widen(self, spec: TensorSpec, region: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
        """Widen in place (the loader's ``convert_in_place``); the weight (N, K) in the slot's dtype."""
        convert_in_place(region, spec, self.fmt, self.scale.reshape(-1), tmp)
        return region.view(getattr(torch, spec.dtype)).view(spec.shape)


def errors(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Max abs error and cosine of ``y`` against the reference, in float64."""
    d = y.double().flatten(), ref.double().flatten()
    return (d[0] - d[1]).abs().max().item(), torch.nn.functional.cosine_similarity(d[0], d[1], dim=0).item()


def measure_case(st: Stored, act: str, shape: tuple[int, int], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every batch of one stored weight with activations in ``act``: the table's rows."""
    n, k = shape
    spec, region, tmp, put = st.slot(ACTS[act])
    widen_s = best_s(lambda: st.widen(spec, region, tmp), args.reps, args.max_s, put)
    put()
    resident = st.widen(spec, region, tmp).clone()  # (N, K) in the activations' dtype
    rows = []
    for batch in args.batches:
        x32 = torch.randn(batch, k)  # (M, K)
        x = x32.to(ACTS[act])
        packed = st.packed_fn(x)
        row = {"shape": f"{n}x{k}", "batch": batch, "act": act, "format": st.fmt,
               "matmul_ms": 1e3 * best_s(functools.partial(torch.matmul, x, resident.T), args.reps, args.max_s),
               "widen_ms": 1e3 * widen_s, "widen_gbps": spec.nbytes / widen_s / 1e9,
               "widen_mm_ms": 1e3 * best_s(functools.partial(widen_then_matmul, st, spec, region, tmp, x), args.reps,
                                           args.max_s, put),
               "packed_ms": 1e3 * best_s(packed, args.reps, args.max_s)}
        row["packed_vs_widen_mm"] = row["packed_ms"] / row["widen_mm_ms"]
        row["packed_vs_matmul"] = row["packed_ms"] / row["matmul_ms"]
        ref = x32 @ st.dequant.T  # (M, N): the float32 matmul of the dequantised weight
        row["max_abs_err"], row["cos"] = errors(packed(), ref)
        put()
        row["widen_mm_max_abs_err"], row["widen_mm_cos"] = errors(widen_then_matmul(st, spec, region, tmp, x), ref)
        if min(row["cos"], row["widen_mm_cos"]) < MIN_COS:
            raise AssertionError(f"{st.fmt} {n}x{k} batch {batch} {act}: cosine {row['cos']:.4f} (packed), "
                                 f"{row['widen_mm_cos']:.4f} (widened) against the float32 reference")
        rows.append(row)
        print(line(row), flush=True)
    return rows


def widen_then_matmul(st: Stored, spec: TensorSpec, region: torch.Tensor, tmp: torch.Tensor,
                      x: torch.Tensor) -> torch.Tensor:
    """What a streamed widened weight costs per use: the loader's widening, then the matmul."""
    return x @ st.widen(spec, region, tmp).T


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n, k in args.shapes:
        torch.manual_seed(n * 7 + k)
        w = torch.randn(n, k) * 0.02  # (N, K)
        for fmt in (int4.stored_name(args.group), "int8"):
            st = Stored(w, fmt)
            for act in args.acts:
                rows += measure_case(st, act, (n, k), args)
    return rows


HEAD = (f"{'shape':>11} {'batch':>5} {'act':>8} {'format':>9} {'matmul ms':>9} {'widen ms':>8} {'GB/s':>5} "
        f"{'widen+mm':>8} {'packed ms':>9} {'vs w+mm':>7} {'vs mm':>6} {'max|err|':>8} {'cos':>9} "
        f"{'w+mm err':>8} {'w+mm cos':>9}")


def line(r: dict[str, Any]) -> str:
    return (f"{r['shape']:>11} {r['batch']:>5} {r['act']:>8} {r['format']:>9} {r['matmul_ms']:9.3f} "
            f"{r['widen_ms']:8.2f} {r['widen_gbps']:5.2f} {r['widen_mm_ms']:8.2f} {r['packed_ms']:9.3f} "
            f"{r['packed_vs_widen_mm']:7.3f} {r['packed_vs_matmul']:6.2f} {r['max_abs_err']:8.1e} {r['cos']:9.6f} "
            f"{r['widen_mm_max_abs_err']:8.1e} {r['widen_mm_cos']:9.6f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir, hw, other = begin_run(args.threads, args.out)
    print(f"int4 groups of {args.group}; best of {args.reps} after a warm-up; 'vs w+mm' / 'vs mm': packed time over "
          "widen+matmul / over the resident matmul (< 1: packed is faster); errors against the float32 matmul of "
          "the dequantised weight", flush=True)
    print(HEAD, flush=True)
    rows = measure(args)
    hw["other_cpu_cores_during"] = other.cores()
    wins = [r for r in rows if r["packed_vs_widen_mm"] < 1]
    print(f"packed beats widen+matmul in {len(wins)} of {len(rows)} cases; against the resident matmul in "
          f"{sum(r['packed_vs_matmul'] < 1 for r in rows)}")
    for act in args.acts:
        for fmt in sorted({r["format"] for r in rows}):
            rs = [r for r in rows if r["act"] == act and r["format"] == fmt]
            if rs:
                ratios = ", ".join(f"{r['shape']} b{r['batch']} {r['packed_vs_widen_mm']:.3f}" for r in rs)
                print(f"  {act} {fmt}: packed / widen+mm: {ratios}")
    if max(hw["other_cpu_cores_before"], hw["other_cpu_cores_during"]) > BUSY_CORES:
        print(f"warning: other processes used {hw['other_cpu_cores_during']:.2f} cores during the run: timings disturbed")
    write_results(out_dir, {"hardware": hw, "args": {k: v for k, v in vars(args).items()}, "rows": rows}, rows, FIELDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
