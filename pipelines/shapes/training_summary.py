"""``TRAINING.md`` beside the shapes weights: what each training record (``training.json``) says, in prose and tables.

``train.py`` writes it after a run; ``rebuild.py`` after the whole chain, one section per run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blockrt.files import write_atomic
from blockrt.pipelines.shapes import layout


def _record_lines(r: dict[str, Any], name: str) -> list[str]:
    lines = [f"    {r['command']}", "",
             f"seed {r['args']['seed']}; {r['args']['clips']} training clips; torch {r['torch']}, {r['threads']} "
             f"thread(s) on a 2-core CPU; record: `{name}`.", "",
             "| stage | last step | time | loss (first logged -> last logged, each a mean of 50 steps) |",
             "|---|---|---|---|"]
    stage_time = {"spatial_vae_mse": "spatial_vae_s", "spatial_vae_weighted_mse_phase2": "spatial_vae_phase2_s",
                  "spatial_vae_weighted_mse_phase3": "spatial_vae_phase3_s", "temporal_vae_mse": "temporal_vae_s"}
    for stage, curve in r["losses"].items():
        if not curve:
            continue
        (s0, v0), (s1, v1) = curve[0], curve[-1]
        secs = r.get("stdit3_s") if stage == "stdit3_loss" else r["times"].get(stage_time.get(stage, ""))
        when = "-" if secs is None else f"{secs / 60:.1f} min"
        lines.append(f"| {stage} | {s1} | {when} | {v0:.4f} (step {s0}) -> {v1:.4f} |")
    kept = r.get("vae_round_trip_kept")
    read_back = "" if kept is None else (
        f" The judge reads back shape {kept['shape']:.0%}, colour {kept['colour']:.0%}, direction {kept['direction']:.0%}.")
    lines += ["", f"VAE round-trip PSNR on {r.get('vae_round_trip_clips', 16)} held-out clips: "
              f"{r.get('vae_reconstruction_psnr_db', float('nan')):.2f} dB.{read_back} "
              f"STDiT3 (EMA, decay {r['objective']['ema_decay']}) saved at step {r.get('stdit3_steps_saved')}."
              + (f" Started from `{r['init_stdit3']['file']}` (sha256 {r['init_stdit3']['sha256'][:16]}...)."
                 if r.get("init_stdit3") else ""), ""]
    return lines


def write_summary(weights: str | Path, records: tuple[str, ...] = (layout.RECORD,), notes: tuple[str, ...] = ()) -> Path:
    """``TRAINING.md`` in ``weights``: for each record (json files there, in order) its command, seed, stage
    times and losses; then ``notes``; then the sizes and objective of the last record."""
    d = Path(weights)
    lines = ["# How these weights were made", ""]
    last: dict[str, Any] = {}
    for k, name in enumerate(records):
        last = json.loads((d / name).read_text())
        if len(records) > 1:
            lines += [f"## Run {k + 1}", ""]
        lines += _record_lines(last, name)
    lines += [*notes, "" if notes else "", f"Sizes: `{json.dumps(last['sizes'])}`.", "",
              f"Objective: `{json.dumps(last['objective'])}`.", ""]
    path, text = d / "TRAINING.md", "\n".join(lines).encode()
    write_atomic(path, lambda f: f.write(text))
    return path
