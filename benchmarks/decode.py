"""Token-by-token generation, the load-bound regime: blockrt against its peers and the physical limit (issue 16).

A Llama-shaped model with random weights, written once in the Hugging Face layout (``save_pretrained``,
safetensors), generates ``--new-tokens`` (32) greedily at each batch size (1, 8, 64), at budgets of 25%, 50% and
100% of its weights' bytes, with a warm page cache and with cold reads (every contender's files dropped from the
page cache before each timed generate). Each contender runs in a fresh process (``decode_worker.py``, the peer
harness's pieces from ``peers_worker.py``), one process per (contender, budget, regime) generating at every batch
size; contenders without a budget (resident, accelerate's disk offload, diffusers' group offloading, airllm) run
once per regime and appear under each budget. Sizes (``--size``):

    tinyllama   TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32 heads (4 KV), MLP 5632, vocab 32000 (4.4 GB fp32)
    small       hidden 512, 8 layers, 8 heads (4 KV), MLP 1408, vocab 8192 (~130 MB): ``--small``
    tiny        hidden 128, 2 layers, vocab 512 (~1.5 MB): the smoke test's

Per row: tokens/s (batch x new tokens / the generate's wall, prefill included; the best of ``--reps``), bytes
read per step (per forward; per token = / batch), the read bandwidth achieved (bytes read / wall), the
**physical limit** (tokens/s if reading those bytes at the bandwidth of a plain sequential read of the same
files, measured in the same process after the run, were the only cost), peak RSS above the baseline
(anonymous / file-backed beside it), and parity: the tokens equal to the resident model's, and the first
row's logits ``torch.equal`` (``=``), or their max abs difference. The packed contenders (``blockrt_int4_packed``,
``blockrt_int8_packed``) also give the fraction of their new tokens equal to their widened contender's
(``blockrt_int4``/``blockrt_int8``, same regime, budget and batch; ``agree`` in the table).

    .venv/bin/python benchmarks/decode.py --small                       # the small grid (~15 min on 2 busy cores)
    .venv/bin/python benchmarks/decode.py --size tiny --batches 1 --budgets 50 --regimes warm   # the smoke run
    .venv/bin/python benchmarks/decode.py                               # TinyLlama's shape: hours on 2 cores
    .venv/bin/python benchmarks/decode.py --report --out DIR            # the tables again from DIR/results.json

On a CPU give each contender ``cores - 1`` threads (``--threads``): blockrt's loader thread needs a core of its
own (with every core computing it is starved and blockrt loses to the peers; see the README).

Writes ``results.json``, ``results.csv`` and ``decode.md`` under ``--out`` (default ``out/bench/decode``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from decode_worker import CONTENDERS, DEFAULT_CONTENDERS, NO_BUDGET, PACKED

ROOT = Path(__file__).resolve().parents[1]

WORKER = Path(__file__).resolve().parent / "decode_worker.py"
SIZES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=8192),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
REGIMES = ("warm", "cold")
WORKER_TIMEOUT_S = 3600
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072", "TQDM_DISABLE": "1",
              "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
              "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
FIELDS = ("regime", "budget_share", "batch", "contender", "tokens_per_s", "bytes_per_step", "bytes_per_token",
          "read_gbps", "plain_read_gbps", "limit_tokens_per_s", "of_limit", "peak_rss", "peak_anon", "peak_file", "peak_gpu",
          "tokens_equal", "logits_equal", "logits_max_abs", "agree_widened", "error")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tinyllama", choices=sorted(SIZES))
    p.add_argument("--small", action="store_true", help="--size small")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--budgets", default="25,50,100", help="percent of the weights' bytes")
    p.add_argument("--regimes", default="warm,cold")
    p.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS), help="comma-separated (resident always runs)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=1, help="timed generates per batch after one warm-up (best kept)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (budget = device memory given to blockrt)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the checkpoint's dtype")
    p.add_argument("--airllm-path", default=os.environ.get("AIRLLM_PATH"),
                   help="a folder holding the airllm package (pip install --target), put on the airllm worker's path")
    p.add_argument("--cache", default="out/weights/random", help="where the checkpoint is written once")
    p.add_argument("--out", default="out/bench/decode")
    p.add_argument("--report", action="store_true",
                   help="run nothing: rebuild the tables from the results.json under --out (its own settings)")
    p.add_argument("--in-process", action="store_true",
                   help="run contenders in this process (fast, for tests: outputs and timings only, RSS meaningless)")
    a = p.parse_args(argv)
    if a.small:
        a.size = "small"
    a.batches = [int(x) for x in a.batches.split(",") if x]
    a.budgets = [int(x) for x in a.budgets.split(",") if x]
    a.regimes = [r for r in a.regimes.split(",") if r]
    a.contenders = ["resident"] + [c for c in a.contenders.split(",") if c and c != "resident"]
    for name, values, known in (("regimes", a.regimes, REGIMES), ("contenders", a.contenders, CONTENDERS)):
        bad = [v for v in values if v not in known]
        if bad:
            p.error(f"--{name}: unknown {bad}; expected among {known}")
    if not a.batches or min(a.batches) < 1 or not a.budgets or min(a.budgets) < 1 or a.reps < 1:
        p.error("--batches, --budgets and --reps need positive values")
    return a


def checkpoint(size: str, dtype: str, cache: Path) -> tuple[Path, dict[str, Any]]:
    """The random checkpoint of ``size`` (written once, atomically: built in a temporary folder, renamed)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = cache / f"decode-{size}-{dtype}"
    if not (d / "config.json").is_file():
        tmp = cache / f".decode-{size}-{dtype}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        torch.manual_seed(0)
        cfg = LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False,
                          torch_dtype=dtype)
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype)).eval()
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
        del model
        _write_tokenizer(tmp, cfg.vocab_size)
        shutil.rmtree(d, ignore_errors=True)
        os.rename(tmp, d)
    cfg = json.loads((d / "config.json").read_text())
    return d, {"dir": str(d), "bytes": sum(p.stat().st_size for p in d.glob("*.safetensors")), "config": cfg}


def _write_tokenizer(d: Path, vocab: int) -> None:
    """A word-level tokenizer of ``vocab`` made-up words beside the weights (airllm loads one; nobody else reads it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0").save_pretrained(d)


def run_worker(job: dict[str, Any], work: Path, log_dir: Path, airllm_path: str | None,
               in_process: bool = False) -> dict[str, Any]:
    """One contender in a fresh process (or here, for tests: outputs and timings only, RSS meaningless)."""
    tag = f"{job['regime']}_{job['budget_share']}_{job['contender']}"
    if in_process:
        import decode_worker
        if airllm_path and job["contender"] == "airllm" and airllm_path not in sys.path:
            sys.path.append(airllm_path)
        return decode_worker.run_job(job)
    job_path, res_path = work / f"{tag}.job.json", work / f"{tag}.result.json"
    job_path.write_text(json.dumps(job))
    env = {**os.environ, **WORKER_ENV}
    if airllm_path and job["contender"] == "airllm":  # after the caller's path (which may carry blockrt itself)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), airllm_path) if p)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(WORKER), str(job_path), str(res_path)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        (log_dir / f"{tag}.log").write_text(proc.stdout + proc.stderr)
        rc, err = proc.returncode, proc.stderr.strip()[-400:]
    except subprocess.TimeoutExpired:
        rc, err = "timeout", f"over {WORKER_TIMEOUT_S} s"
    if rc != 0 or not res_path.is_file():
        return {"contender": job["contender"], "batches": {}, "error": f"worker exited with {rc} after "
                f"{time.perf_counter() - t0:.0f} s (log: {log_dir / (tag + '.log')}): {err}"}
    return json.loads(res_path.read_text())


def _load(path: str | None) -> dict[str, Any] | None:
    if not path or not Path(path).is_file():
        return None
    from safetensors.torch import load_file
    return load_file(path)


def resident_outputs(res: dict[str, dict[str, Any]], batches: list[int]) -> dict[int, dict[str, Any]]:
    """The resident model's outputs per batch (the parity reference of one budget's runs), where it wrote them."""
    runs = res.get("resident", {}).get("batches", {})
    return {b: v for b in batches if (v := _load(runs.get(str(b), {}).get("output"))) is not None}


def rows_of(results: dict[str, dict[str, Any]], args: argparse.Namespace, regime: str, share: int,
            ref: dict[int, dict[str, Any]], budget: int | None = None) -> list[dict[str, Any]]:
    """The table rows of one (regime, budget): every contender at every batch, parity against ``ref``."""
    import torch

    out = []
    for name in args.contenders:
        r = results.get(name)
        if r is None:
            continue
        plain = (r.get("plain_read") or {}).get("bytes_per_s")
        for batch in args.batches:
            b = r.get("batches", {}).get(str(batch), {})
            row: dict[str, Any] = {"regime": regime, "budget_share": share, "batch": batch, "contender": name,
                                   "budget_bytes": budget, "error": r.get("error") or b.get("error")}
            if "wall_s" in b:
                tokens = batch * args.new_tokens
                per_step = b["bytes_per_step"]
                row.update(tokens_per_s=tokens / b["wall_s"], bytes_per_step=per_step, bytes_per_token=per_step / batch,
                           read_gbps=per_step * args.new_tokens / b["wall_s"] / 1e9,
                           plain_read_gbps=plain / 1e9 if plain else None,
                           peak_rss=b["peak_rss"], peak_anon=b["peak_anon"], peak_file=b["peak_file"],
                           peak_gpu=b.get("peak_gpu"),
                           retained_blocks=b.get("retained_blocks"), peak_ledger=b.get("peak_ledger"))
                limit = tokens / (per_step * args.new_tokens / plain) if plain and per_step else math.inf
                row["limit_tokens_per_s"] = limit
                row["of_limit"] = row["tokens_per_s"] / limit if math.isfinite(limit) else None
                got, want = _load(b.get("output")), ref.get(batch)
                if got is not None and want is not None:
                    row["tokens_equal"] = torch.equal(got["sequences"], want["sequences"])
                    row["logits_equal"] = torch.equal(got["logits"], want["logits"])
                    row["logits_max_abs"] = float((got["logits"] - want["logits"]).abs().max())
                if name in PACKED and got is not None:
                    row["agree_widened"] = agreement(got, results.get(PACKED[name]), batch, args.prompt_tokens)
            out.append(row)
    return out


def agreement(got: dict[str, Any], widened: dict[str, Any] | None, batch: int, prompt_tokens: int) -> float | None:
    """The fraction of the new tokens in ``got`` equal to the widened contender's at ``batch`` (None: not run)."""
    b = (widened or {}).get("batches", {}).get(str(batch), {})
    other = _load(b.get("output"))
    if other is None:
        return None
    new, ref = got["sequences"][:, prompt_tokens:], other["sequences"][:, prompt_tokens:]  # (batch, new)
    return float((new == ref).float().mean())


def _fmt(x: Any, spec: str, none: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none if x is None else "inf"
    return format(x, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'regime':<6} {'budget':>6} {'batch':>5} {'contender':<24} {'tok/s':>8} {'MB/step':>8} {'MB/tok':>8} "
            f"{'read GB/s':>9} {'plain GB/s':>10} {'limit tok/s':>11} {'of limit':>8} {'RSS MB':>7} {'anon':>7} "
            f"{'file':>7} parity")
    lines = [head]
    for r in rows:
        if r.get("tokens_per_s") is None:
            lines.append(f"{r['regime']:<6} {r['budget_share']:>5}% {r['batch']:>5} {r['contender']:<24} "
                         f"error: {(r['error'] or '')[:150]}")
            continue
        parity = ("tokens=" if r.get("tokens_equal") else "TOKENS DIFFER") + (
            " logits=" if r.get("logits_equal") else f" logits max|d| {_fmt(r.get('logits_max_abs'), '.2e')}")
        lines.append(
            f"{r['regime']:<6} {r['budget_share']:>5}% {r['batch']:>5} {r['contender']:<24} "
            f"{r['tokens_per_s']:8.1f} {r['bytes_per_step'] / 1e6:8.1f} {r['bytes_per_token'] / 1e6:8.2f} "
            f"{r['read_gbps']:9.2f} {_fmt(r['plain_read_gbps'], '10.2f')} {_fmt(r['limit_tokens_per_s'], '11.1f')} "
            f"{_fmt(r['of_limit'], '8.2f')} {r['peak_rss'] / 1e6:7.0f} {r['peak_anon'] / 1e6:7.0f} "
            f"{r['peak_file'] / 1e6:7.0f} {parity}"
            + (f" agree {r['agree_widened']:.3f}" if r.get("agree_widened") is not None else "")
            + (f" GPU peak {r['peak_gpu'] / 1e9:.2f} GB" if r.get("peak_gpu") is not None else ""))
    return "\n".join(lines)


def batching(rows: list[dict[str, Any]]) -> str:
    """Throughput batching (FlexGen's point): per contender, regime and budget, tokens/s and MB read per step
    from the smallest batch to the largest; one block load serves the whole batch, so MB/step stays flat."""
    lines = ["throughput batching: tokens/s and MB read per step, smallest -> largest batch"]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("tokens_per_s") is not None:
            groups.setdefault((r["regime"], r["budget_share"], r["contender"]), []).append(r)
    for (regime, share, name), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["batch"])
        if len(rs) < 2:
            continue
        a, z = rs[0], rs[-1]
        lines.append(f"  {regime:<5} {share:>3}% {name:<24} batch {a['batch']} -> {z['batch']}: "
                     f"{a['tokens_per_s']:.1f} -> {z['tokens_per_s']:.1f} tok/s "
                     f"(x{z['tokens_per_s'] / a['tokens_per_s']:.1f}); "
                     f"{a['bytes_per_step'] / 1e6:.1f} -> {z['bytes_per_step'] / 1e6:.1f} MB/step")
    return "\n".join(lines)


PEERS = ("accelerate_device_map", "accelerate_disk_offload", "accelerate_cpu_offload", "diffusers_group_offload",
         "airllm")
FP32_BLOCKRT = ("blockrt", "blockrt_mapped")  # the prefetching contenders in the checkpoint's dtype
LOW_BIT = ("blockrt_int4", "blockrt_int4_packed", "blockrt_int8", "blockrt_int8_packed")


def targets(rows: list[dict[str, Any]]) -> str:
    """The issue's targets per (regime, budget, batch): blockrt's best fp32 contender and its best 4-bit one over
    the best peer's tokens/s (same budget and weight dtype), each prefetching contender's share of its physical
    limit, and whether its anonymous peak stayed within the budget. The anonymous peak is counted above the
    resident model's at the same batch (whose weights are file-backed: transformers maps the safetensors file),
    so the framework's own memory (the model object, generate's buffers, the allocator) is not charged to the
    budget; the file-backed peak is given beside it."""
    lines = ["targets: speed-up over the best peer (cold >= 1.5x, warm >= 1.2x, 4-bit cold >= 4x); of limit >= 0.85;"
             " anonymous peak above the resident model's within the budget"]
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r.get("tokens_per_s") is not None:
            groups.setdefault((r["regime"], r["budget_share"], r["batch"]), {})[r["contender"]] = r
    for (regime, share, batch), by in groups.items():
        peers = [by[n] for n in PEERS if n in by]
        if not peers:
            continue
        best = max(peers, key=lambda r: r["tokens_per_s"])
        parts = [f"best peer {best['contender']} {best['tokens_per_s']:.1f} tok/s"]
        for family in (FP32_BLOCKRT, LOW_BIT):
            mine = [by[n] for n in family if n in by]
            if mine:
                top = max(mine, key=lambda r: r["tokens_per_s"])
                parts.append(f"{top['contender']} x{top['tokens_per_s'] / best['tokens_per_s']:.2f}")
        floor = by["resident"]["peak_anon"] if "resident" in by else 0
        for n in FP32_BLOCKRT + LOW_BIT:
            if n in by:
                r = by[n]
                anon, budget = r["peak_anon"] - floor, r.get("budget_bytes")
                within = "" if budget is None else (" within" if anon <= budget else " OVER budget")
                parts.append(f"{n} of limit {_fmt(r.get('of_limit'), '.2f')}, anon {anon / 1e6:+.0f} MB{within} "
                             f"(file {r['peak_file'] / 1e6:.0f})")
        lines.append(f"  {regime:<5} {share:>3}% batch {batch:>3}: " + "; ".join(parts))
    return "\n".join(lines)


def report_text(rows: list[dict[str, Any]]) -> str:
    """The table, the throughput-batching lines and the targets, as printed and written to ``decode.md``."""
    return table(rows) + "\n\n" + batching(rows) + "\n\n" + targets(rows)


def save(out: Path, results: dict[str, Any], rows: list[dict[str, Any]], wall_s: float) -> None:
    """results.json, results.csv and decode.md as they stand, each written atomically."""
    from bench_common import write_results

    results["rows"] = rows
    results["wall_s"] = wall_s
    write_results(out, results, rows, FIELDS)
    tmp = out / ".decode.md.tmp"
    tmp.write_text("```\n" + report_text(rows) + "\n```\n")
    tmp.rename(out / "decode.md")


def report(out: Path) -> int:
    """Rebuild rows and tables from ``out/results.json`` (the settings it was run with), rewrite them, print them."""
    results = json.loads((out / "results.json").read_text())
    args = argparse.Namespace(**results["config"])
    rows: list[dict[str, Any]] = []
    for key, res in results["runs"].items():
        regime, share = key.split("/")
        ref = resident_outputs(res, args.batches)
        rows += rows_of(res, args, regime, int(share), ref, int(results["weights_bytes"] * int(share) / 100))
    save(out, results, rows, results.get("wall_s", 0.0))
    print(report_text(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench_common import hardware

    out = Path(args.out).resolve()
    if args.report:
        return report(out)
    work, logs = out / "work", out / "logs"
    for d in (work, logs):
        d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt, info = checkpoint(args.size, args.dtype, Path(args.cache).resolve())
    weights = info["bytes"]
    hw = hardware()
    print(f"decode: {hw['cpu']}, {hw['cores']} cores, torch {hw['torch']}, {args.threads} threads per contender, "
          f"device {args.device}; load average {os.getloadavg()[0]:.1f}", flush=True)
    c = info["config"]
    print(f"  Llama ({args.size}): hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, vocab "
          f"{c['vocab_size']}, {weights / 1e6:.0f} MB {args.dtype}; greedy {args.new_tokens} new tokens after "
          f"{args.prompt_tokens} prompt tokens; batches {args.batches}; budgets {args.budgets}% of the weights",
          flush=True)
    results: dict[str, Any] = {"hardware": hw, "config": {k: v for k, v in vars(args).items()}, "weights_bytes": weights,
                               "model": info["config"], "runs": {},
                               "command": " ".join([".venv/bin/python benchmarks/decode.py",
                                                    *(sys.argv[1:] if argv is None else argv)])}
    all_rows: list[dict[str, Any]] = []
    for regime in args.regimes:
        once: dict[str, dict[str, Any]] = {}
        ref: dict[int, dict[str, Any]] = {}
        for share in args.budgets:
            budget = int(weights * share / 100)
            res: dict[str, dict[str, Any]] = {}
            for name in args.contenders:
                if name in NO_BUDGET and name in once:
                    res[name] = once[name]
                    continue
                job = {"contender": name, "regime": regime, "budget": budget, "budget_share": share,
                       "dir": str(ckpt), "vocab": c["vocab_size"], "batches": args.batches,
                       "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "reps": args.reps,
                       "threads": args.threads, "device": args.device, "dtype": args.dtype,
                       "offload_dir": str(work / f"offload-{name}"), "store_root": str(work / "stores"),
                       "output_prefix": str(work / f"out_{regime}_{share}_{name}")}
                t1 = time.perf_counter()
                res[name] = run_worker(job, work, logs, args.airllm_path, args.in_process)
                print(f"  {regime} {share}% {name}: {time.perf_counter() - t1:.0f} s"
                      + (f" ({res[name]['error'][:200]})" if res[name].get("error") else ""), flush=True)
                if name in NO_BUDGET:
                    once[name] = res[name]
                if name == "resident":
                    ref = resident_outputs(res, args.batches)
            results["runs"][f"{regime}/{share}"] = res
            all_rows += rows_of(res, args, regime, share, ref, budget)
            save(out, results, all_rows, time.perf_counter() - t0)  # after each budget: a cut-short run keeps its rows
    print(report_text(all_rows))
    print(f"wrote {out / 'results.json'}, {out / 'results.csv'} and {out / 'decode.md'} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
