"""Overhead benchmark: what blockrt costs per pass once blocks are retained (one run, one machine).

A small Llama (``transformers.LlamaConfig``, random weights) runs a repeated forward and ``model.generate``
(greedy, KV cache, ``--new`` tokens) three ways: plain, inside ``blockrt.run`` with a budget far above the
model (every block retained, bound once), and at half the model's bytes (part streamed), each on its own copy
of the model, all three open at once. Each mode warms up (the measuring passes), then the modes are timed in turn,
round by round (``--repeats`` rounds of ``FORWARDS`` forwards and one generate), and each figure is the median round: load
that comes and goes on a shared machine hits every mode alike. The tokens of every mode are checked equal to plain
``generate`` before and after timing. Prints the per-pass times and the ratios to plain, with the issue's targets
(PASS/MISS, not asserted), and writes ``results.json``/``results.csv`` into ``--out``.

    .venv/bin/python benchmarks/overhead.py            # ~2 min on the 2-core dev machine (3 processes)
    .venv/bin/python benchmarks/overhead.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

import blockrt
from blockrt.partitioners import partition
from bench_common import BUSY_CORES, begin_run, write_results

TARGET_GENERATE = 1.10  # blockrt with every block retained / plain, generate
TARGET_FORWARD = 1.05  # ... repeated forward
FORWARDS = 10  # forwards per round (a round's forward time is their mean)
CSV_FIELDS = ("mode", "budget", "forward_ms", "forward_ratio", "forward_cpu_ratio", "generate_ms", "generate_ratio",
              "generate_cpu_ratio", "retained", "blocks", "peak_ledger_bytes", "tokens_equal")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/bench/overhead", help="directory for results.json/csv")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--new", type=int, default=32, help="new tokens per generate")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 11; --quick 2)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--processes", type=int, default=None, help="fresh processes, figures are their medians "
                   "(default 3; --quick 1)")
    p.add_argument("--child-json", default=None, help=argparse.SUPPRESS)  # a child: write its rows here, print nothing
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.processes is None:
        args.processes = 1 if args.quick else 3
    if args.repeats is None:
        args.repeats = 2 if args.quick else 11
    if args.quick:
        args.layers, args.hidden, args.new = 4, 128, 8
    return args


def build(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=1000, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


class Timed:
    """One mode's model (plain, or streamed by an open runtime) and its timings, one entry per round."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> None:
        self.model, self.ids, self.args = model, ids, args
        self.fwd: list[float] = []
        self.fwd_cpu: list[float] = []
        self.gen: list[float] = []
        self.gen_cpu: list[float] = []

    def generate(self) -> torch.Tensor:
        return self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), max_new_tokens=self.args.new,
                                   min_new_tokens=self.args.new, do_sample=False, pad_token_id=0)

    def warm_up(self) -> torch.Tensor:
        """The measuring passes (forward, then generate's two input kinds); returns the tokens."""
        with torch.no_grad():
            for _ in range(3):
                self.model(self.ids)
            self.generate()
            return self.generate()

    def round(self) -> None:
        """Time ``FORWARDS`` forwards and one generate. CPU: the calling thread's CPU time (``time.thread_time``), which other
        load disturbs far less than wall time; blockrt's per-pass bookkeeping runs on this thread."""
        with torch.no_grad():
            t, c = time.perf_counter(), time.thread_time()
            for _ in range(FORWARDS):
                self.model(self.ids)
            self.fwd.append((time.perf_counter() - t) / FORWARDS)
            self.fwd_cpu.append((time.thread_time() - c) / FORWARDS)
            t, c = time.perf_counter(), time.thread_time()
            self.generate()
            self.gen.append(time.perf_counter() - t)
            self.gen_cpu.append(time.thread_time() - c)


def measure(args: argparse.Namespace) -> tuple[list[dict], int, int]:
    """One process's rows (one per mode), the number of blocks and the model's bytes."""
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(1))
    plan = partition(build(args))
    model_bytes = plan.pinned_bytes + sum(b.nbytes for b in plan.blocks)
    budgets = {"plain": None, "retained": 100 * model_bytes, "half": model_bytes // 2}
    with contextlib.ExitStack() as stack:
        # the three modes side by side (each its own copy of the model), timed round by round in turn, so a change
        # in the machine's load or clock between rounds hits every mode alike; each figure is the median round
        runtimes, timed, tokens = {}, {}, {}
        for mode, budget in budgets.items():
            model = build(args)
            if budget is not None:
                runtimes[mode] = stack.enter_context(blockrt.run(model, budget=budget))
            timed[mode] = Timed(model, ids, args)
            tokens[mode] = timed[mode].warm_up()
        for _ in range(args.repeats):
            for t in timed.values():
                t.round()
        after = {mode: t.generate() for mode, t in timed.items()}  # after timing: still right
        base = timed["plain"]
        rows = []
        for mode, t in timed.items():
            rt = runtimes.get(mode)
            rows.append(dict(
                mode=mode, budget=budgets[mode], forward_ms=median(t.fwd) * 1e3,
                forward_ratio=median(t.fwd) / median(base.fwd), forward_cpu_ratio=median(t.fwd_cpu) / median(base.fwd_cpu),
                generate_ms=median(t.gen) * 1e3, generate_ratio=median(t.gen) / median(base.gen),
                generate_cpu_ratio=median(t.gen_cpu) / median(base.gen_cpu),
                retained=None if rt is None else len(rt.retention.retained), blocks=len(plan.blocks),
                peak_ledger_bytes=None if rt is None else rt.ledger.peak,
                tokens_equal=bool(torch.equal(tokens[mode], tokens["plain"]) and torch.equal(after[mode], tokens["plain"]))))
    return rows, len(plan.blocks), model_bytes


def in_processes(args: argparse.Namespace, argv: list[str]) -> tuple[list[dict], int, int, list[list[dict]]]:
    """``measure`` in ``args.processes`` fresh processes, one after another; per mode the median of each figure."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.processes):
            path = Path(tmp) / f"{k}.json"
            subprocess.run([sys.executable, __file__, *argv, "--child-json", str(path)], check=True)
            runs.append(json.loads(path.read_text()))
    per_process = [r["rows"] for r in runs]
    rows = []
    for i, first in enumerate(per_process[0]):
        row = dict(first)
        for key in ("forward_ms", "forward_ratio", "forward_cpu_ratio", "generate_ms", "generate_ratio", "generate_cpu_ratio"):
            row[key] = median(p[i][key] for p in per_process)
        row["peak_ledger_bytes"] = None if first["peak_ledger_bytes"] is None else max(p[i]["peak_ledger_bytes"] for p in per_process)
        row["tokens_equal"] = all(p[i]["tokens_equal"] for p in per_process)
        rows.append(row)
    return rows, runs[0]["blocks"], runs[0]["model_bytes"], per_process


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child_json:
        rows, blocks, model_bytes = measure(args)
        Path(args.child_json).write_text(json.dumps({"rows": rows, "blocks": blocks, "model_bytes": model_bytes}))
        return 0
    out_dir, hw, other = begin_run(args.threads, args.out)
    if args.processes > 1:
        rows, blocks, model_bytes, per_process = in_processes(args, argv)
    else:
        (rows, blocks, model_bytes), per_process = measure(args), []
    hw["other_cpu_cores_during"] = other.cores()
    print(f"Llama {args.layers} layers, hidden {args.hidden}, {blocks} blocks, model {model_bytes / 1e6:.1f} MB;"
          f" generate {args.new} new tokens; medians of {args.repeats} rounds, the modes in turn"
          + (f"; medians over {args.processes} processes" if per_process else ""))
    print(f"{'mode':<10}{'budget':>12}{'forward ms':>12}{'ratio':>8}{'cpu':>7}{'generate ms':>13}{'ratio':>8}"
          f"{'cpu':>7}{'retained':>10}{'tokens':>8}")
    for r in rows:
        budget = "-" if r["budget"] is None else f"{r['budget'] / 1e6:.1f} MB"
        kept = "-" if r["retained"] is None else f"{r['retained']}/{r['blocks']}"
        print(f"{r['mode']:<10}{budget:>12}{r['forward_ms']:>12.2f}{r['forward_ratio']:>8.3f}"
              f"{r['forward_cpu_ratio']:>7.3f}{r['generate_ms']:>13.1f}{r['generate_ratio']:>8.3f}"
              f"{r['generate_cpu_ratio']:>7.3f}{kept:>10}{'equal' if r['tokens_equal'] else 'DIFFER':>8}")
    for k, run in enumerate(per_process):
        r = run[1]
        print(f"  process {k + 1}: retained forward {r['forward_ratio']:.3f}x, generate {r['generate_ratio']:.3f}x")
    kept = rows[1]
    print("ratio: wall time / plain; cpu: the calling thread's CPU time / plain (less disturbed by other load)")
    print(f"target: retained forward <= {TARGET_FORWARD}x: {'PASS' if kept['forward_ratio'] <= TARGET_FORWARD else 'MISS'};"
          f" retained generate <= {TARGET_GENERATE}x: {'PASS' if kept['generate_ratio'] <= TARGET_GENERATE else 'MISS'}")
    if max(hw["other_cpu_cores_before"], hw["other_cpu_cores_during"]) > BUSY_CORES:
        print(f"warning: other processes used {hw['other_cpu_cores_during']:.2f} cores during the run: timings disturbed")
    write_results(out_dir, {"hardware": hw, "args": vars(args), "rows": rows, "per_process": per_process}, rows,
                  CSV_FIELDS)
    if not all(r["tokens_equal"] for r in rows):
        print("tokens differ from plain generate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
