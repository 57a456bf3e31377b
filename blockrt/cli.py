"""The ``blockrt`` command line: thin wrappers over the Python API (the only place that prints)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .budget import format_bytes, parse_budget
from .config import RunConfig
from .runtime import run

IPHONE15PRO_READ_BPS = 1.45e9  # sequential flash read of the phone class the paper targets


def _demo(args: argparse.Namespace) -> int:
    from pipelines.toy import ToyConfig, ToyTransformer

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = ToyConfig(vocab=1024, dim=args.dim, n_layers=args.layers, n_heads=8, max_len=args.tokens)
    model = ToyTransformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab, (1, args.tokens))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        model(ids)  # warm-up
        t0 = time.perf_counter()
        ref = model(ids)
        resident_s = time.perf_counter() - t0
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    bps = None if args.read_gbps <= 0 else args.read_gbps * 1e9
    config = RunConfig(prefetch_depth=args.prefetch, read_bytes_per_s=bps)
    print(f"toy transformer: {cfg.n_layers} layers x dim {cfg.dim}, {format_bytes(model_bytes)} of fp32 weights; "
          f"budget {format_bytes(parse_budget(args.budget))}; loader throttled to "
          f"{'disk speed' if bps is None else f'{bps / 1e9:.2f} GB/s (iPhone 15 Pro flash)'}")
    with run(model, budget=args.budget, config=config) as rt:
        same = all(torch.equal(rt(ids), ref) for _ in range(args.passes))
        print(rt.profile)
        print(f"  resident (plain model)   {resident_s * 1e3:.1f} ms per pass, whole model in memory")
        print(f"outputs identical to the plain model (torch.equal): {'yes' if same else 'NO'}")
        rt.profile.save_trace(out_dir / "trace.json")
        rt.profile.plot(out_dir / "timeline.png")
    print(f"wrote {out_dir / 'trace.json'} (open in https://ui.perfetto.dev) and {out_dir / 'timeline.png'}")
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blockrt", description="Run models larger than memory, block by block.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="stream a built-in transformer under a small budget and show the timeline")
    demo.add_argument("--out", default="out/demo", help="directory for trace.json and timeline.png")
    demo.add_argument("--budget", default="64MB", help="memory budget, e.g. 64MB, 1GiB")
    demo.add_argument("--layers", type=int, default=12)
    demo.add_argument("--dim", type=int, default=512)
    demo.add_argument("--tokens", type=int, default=256)
    demo.add_argument("--passes", type=int, default=5)
    demo.add_argument("--prefetch", type=int, default=1, help="prefetch depth (0 = sequential loading)")
    demo.add_argument("--read-gbps", type=float, default=IPHONE15PRO_READ_BPS / 1e9,
                      help="throttle loads to this many GB/s (0 = disk speed)")
    demo.add_argument("--threads", type=int, default=2, help="torch compute threads")
    args = parser.parse_args(argv)
    try:
        return {"demo": _demo}[args.command](args)
    except (ValueError, OSError) as e:
        print(f"blockrt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
