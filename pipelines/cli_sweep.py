"""``blockrt sweep SPEC`` and ``blockrt generate --prompts FILE --workers N``: a sweep run from the command line.

Prints one line per finished task (unless ``--quiet`` / ``--no-progress``), then the summary table and where
the results are; exit 0 when every task succeeded, 1 when some failed (their errors are in ``summary.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from blockrt.pipelines.sweep.spec import SweepSpec


def _run(spec: SweepSpec, out: Path, args: argparse.Namespace, say: Any) -> int:
    from blockrt.pipelines.sweep.report import write_report
    from blockrt.pipelines.sweep.runner import run_sweep

    total = len(spec.tasks())
    where = f"Ray cluster {args.address}" if args.address else (
        f"{args.workers} local Ray workers" if args.workers else "this process (serially)")
    say(f"sweep: {len(spec.prompts)} prompts x {len(spec.seeds)} seeds x {len(spec.settings)} settings = {total} "
        f"tasks into {out}, on {where}")
    quiet = args.quiet or args.no_progress

    def progress(record: dict[str, Any], done: int, todo: int) -> None:
        if not quiet:
            what = f"{record.get('wall_s', 0):.1f} s" if record["status"] == "ok" else f"FAILED: {record['error']}"
            print(f"  [{done}/{todo}] {record['id']}: {what}", file=sys.stderr, flush=True)

    run = run_sweep(spec, out, workers=args.workers or 0, address=args.address,
                    retry_failed=getattr(args, "retry_failed", False), on_record=progress, report=False)
    summary = write_report(spec, out, run.records)
    say(f"{run.ran} tasks ran ({run.skipped} already finished, skipped) in {run.wall_s:.1f} s, {run.mode}; "
        f"CPU {run.cpu_s:.1f} s ({run.cpu_s / max(run.wall_s, 1e-9):.2f} cores)")
    say((out / "summary.md").read_text(encoding="utf-8").split("\n\n")[2])  # the table
    say(f"wrote {out / 'summary.md'}, summary.csv, summary.json, contact_<setting>.png; videos in {out / 'tasks'}")
    if getattr(args, "json", False):
        json.dump({k: {f: v for f, v in row.items() if f not in ("per_task", "errors")}
                   for k, row in summary["settings"].items()}, sys.stdout, indent=1, default=str)
        print()
    return 1 if run.failed else 0


def sweep(args: argparse.Namespace, say: Any) -> int:
    """``blockrt sweep SPEC``."""
    spec = SweepSpec.load(args.spec)
    out = Path(args.out) if args.out else Path("out/sweep") / Path(args.spec).stem
    return _run(spec, out, args, say)


def generate_sweep(args: argparse.Namespace, say: Any) -> int:
    """``blockrt generate --prompts FILE --workers N [--address ...]``: one setting from the generate flags."""
    if args.prompts is None:
        raise ValueError("--workers / --address run a file of prompts; pass --prompts FILE (one prompt a line)")
    if args.random_weights or args.trace or args.device_profile:
        raise ValueError("--workers / --address do not combine with --random-weights, --trace or --device-profile")
    from blockrt.pipelines.cli_generate import prepare

    configs, _ = prepare(args, say)
    c = configs[0]
    doc = {"prompts": [c.prompt for c in configs], "seeds": [args.seed], "frames": c.frames,
           "resolution": c.resolution, "aspect": c.aspect, "cfg": c.cfg_scale, "weights": args.weights,
           "settings": [{"name": "generate", "steps": c.steps, "lpl": c.lpl, "tdtm": c.merge_steps,
                         "budget": args.budget}]}
    return _run(SweepSpec.from_dict(doc, source="generate flags"), Path(args.out), args, say)
