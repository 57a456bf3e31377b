"""A finished sweep's results, read back from its output folder: tables per setting, contact sheets, quality.

- ``summary.json`` (every setting and every task), ``summary.csv`` (one line per setting) and ``summary.md``:
  tasks ok / failed, model calls, wall and CPU seconds per video, the largest peak ledger and RSS growth against
  the budget, and the quality benchmark's columns (``shapes/scoring.py``): fidelity, colour and direction
  accuracy and flicker from the judge, PSNR and SSIM against the reference setting's video of the same prompt
  and seed. Scores use the videos' ``frames.npy`` (the uint8 frames the mp4 was encoded from), over the tasks
  whose reference also succeeded; the judge's columns need captions the shapes model knows (else empty).
- ``contact_<setting>.png``: for every video of the setting, its first, middle and last frames, labelled with
  the prompt index, the seed and whether the judge agrees with the prompt (failed tasks: a grey cell).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from blockrt.files import write_atomic
from blockrt.pipelines.sweep.spec import SweepSpec
from blockrt.pipelines.sweep.task import FRAMES, TASKS

CSV_FIELDS = ["setting", "steps", "lpl", "tdtm", "budget", "storage_dtype", "tasks", "ok", "failed", "scored",
              "model_calls", "wall_s_mean", "wall_s_total", "cpu_s_total", "peak_ledger_bytes", "peak_rss_delta",
              "fidelity", "colour_accuracy", "direction_accuracy", "flicker", "psnr_db", "ssim"]
CELL_GAP, FRAME_GAP, LABEL_H, CELLS_PER_ROW = 8, 2, 14, 4


def _safe(x: Any) -> Any:
    """Strict JSON: NaN -> null, +inf (PSNR of identical videos) -> "inf"."""
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else None
    if isinstance(x, dict):
        return {k: _safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_safe(v) for v in x]
    return x


def _frames(out: Path, record: dict[str, Any]) -> np.ndarray:
    return np.load(out / TASKS / record["id"] / FRAMES)  # (T, H, W, 3) uint8


def _quality(out: Path, records: list[dict[str, Any]], refs: dict[tuple[int, int], dict[str, Any]]) -> dict[str, Any]:
    """The quality columns of one setting's ok records against the reference records (by prompt, seed)."""
    from blockrt.pipelines.shapes.dataset import parse_caption
    from blockrt.pipelines.shapes.judge import psnr, ssim
    from blockrt.pipelines.shapes.scoring import mean_psnr, score

    pairs = [(r, refs[(r["prompt_index"], r["seed"])]) for r in records if (r["prompt_index"], r["seed"]) in refs]
    if not pairs:
        return {"scored": 0}
    videos = [_frames(out, r) for r, _ in pairs]
    ref_videos = [_frames(out, ref) for _, ref in pairs]
    captions = [r["prompt"] for r, _ in pairs]
    try:
        for c in captions:
            parse_caption(c)
    except ValueError:  # not the shapes model's captions: no judge, only the comparisons with the reference
        return {"scored": len(pairs), "psnr_db": mean_psnr([psnr(v, r) for v, r in zip(videos, ref_videos)]),
                "ssim": float(np.mean([ssim(v, r) for v, r in zip(videos, ref_videos)]))}
    m = score(videos, ref_videos, captions)
    m["scored"] = len(pairs)
    m["per_task"] = {r["id"]: {"matches": ok, "detected": d} for (r, _), ok, d in zip(pairs, m.pop("matches"),
                                                                                      m.pop("detected"))}
    return m


def summarize(spec: SweepSpec, out: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per setting: counts, costs and quality (see the module docstring)."""
    ref_name = spec.reference_setting
    refs = {(r["prompt_index"], r["seed"]): r for r in records if r["setting"] == ref_name and r["status"] == "ok"}
    rows: dict[str, Any] = {}
    for s in spec.settings:
        mine = [r for r in records if r["setting"] == s.name]
        ok = [r for r in mine if r["status"] == "ok"]
        row: dict[str, Any] = {"setting": s.name, "steps": s.steps, "lpl": s.lpl, "tdtm": s.tdtm, "budget": s.budget,
                               "storage_dtype": s.storage_dtype, "tasks": len(mine), "ok": len(ok),
                               "failed": len(mine) - len(ok)}
        if ok:
            row.update(model_calls=float(np.mean([r["model_calls"] for r in ok])),
                       wall_s_mean=float(np.mean([r["wall_s"] for r in ok])),
                       wall_s_total=float(sum(r["wall_s"] for r in ok)),
                       cpu_s_total=float(sum(r.get("cpu_s", 0.0) for r in ok)),
                       peak_ledger_bytes=max(r["peak_ledger_bytes"] for r in ok),
                       peak_rss_delta=max((r["peak_rss_delta"] or 0) for r in ok))
        row.update(_quality(out, ok, refs))
        row["errors"] = {r["id"]: r["error"] for r in mine if r["status"] != "ok"}
        rows[s.name] = row
    return {"reference": ref_name, "settings": rows, "tasks": records}


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "identical"
    return format(v, spec)


def markdown(spec: SweepSpec, summary: dict[str, Any]) -> str:
    """``summary.md``: the per-setting table, the prompts by index, and the failures."""
    from blockrt.budget import format_bytes

    lines = [f"# Sweep: {len(spec.prompts)} prompts x {len(spec.seeds)} seeds x {len(spec.settings)} settings",
             "", f"{spec.resolution} {spec.aspect}, {spec.frames} frames, CFG {spec.cfg:g}, {spec.threads} torch "
             f"thread(s) per task; PSNR/SSIM against `{summary['reference']}` of the same prompt and seed.", "",
             "| setting | ok / tasks | model calls | s per video | peak ledger | peak RSS growth | fidelity | colour | "
             "direction | flicker | PSNR (dB) | SSIM | contact sheet |", "|" + "---|" * 13]
    for name, r in summary["settings"].items():
        pct = (lambda k: "-" if r.get(k) is None else f"{100 * r[k]:.1f}%")
        mem = (lambda k: "-" if r.get(k) is None else format_bytes(r[k]))
        lines.append(f"| {name} | {r['ok']} / {r['tasks']} | {_fmt(r.get('model_calls'), '.1f')} | "
                     f"{_fmt(r.get('wall_s_mean'), '.2f')} | {mem('peak_ledger_bytes')} | {mem('peak_rss_delta')} | "
                     f"{pct('fidelity')} | {pct('colour_accuracy')} | {pct('direction_accuracy')} | "
                     f"{_fmt(r.get('flicker'), '.2f')} | {_fmt(r.get('psnr_db'), '.2f')} | {_fmt(r.get('ssim'), '.4f')} "
                     f"| [png]({contact_name(name)}) |")
    lines += ["", "Prompts: " + "; ".join(f"p{i:03d} {p!r}" for i, p in enumerate(spec.prompts)) + "."]
    errors = [(k, v) for r in summary["settings"].values() for k, v in r["errors"].items()]
    if errors:
        lines += ["", "## Failed tasks", ""] + [f"- `{k}`: {v}" for k, v in errors]
    return "\n".join(lines) + "\n"


def contact_name(setting: str) -> str:
    return f"contact_{re.sub(r'[^A-Za-z0-9_.+=-]+', '_', setting)}.png"


def contact_sheet(out: Path, records: list[dict[str, Any]], judged: dict[str, Any], path: Path) -> None:
    """First, middle and last frames of each record's video in a grid of ``CELLS_PER_ROW`` videos, labelled."""
    from PIL import Image, ImageDraw

    frames = {r["id"]: _frames(out, r) for r in records if r["status"] == "ok"}
    shape = next(iter(frames.values())).shape if frames else (1, 64, 64, 3)
    h, w = shape[1], shape[2]
    scale = 2 if h <= 64 and len(records) <= 48 else 1
    cell_w, cell_h = 3 * w * scale + 2 * FRAME_GAP, h * scale + LABEL_H
    cols = min(CELLS_PER_ROW, len(records))
    rows = -(-len(records) // cols)
    sheet = Image.new("RGB", (cols * (cell_w + CELL_GAP) + CELL_GAP, rows * (cell_h + CELL_GAP) + CELL_GAP), "white")
    draw = ImageDraw.Draw(sheet)
    for k, r in enumerate(records):
        x0 = CELL_GAP + (k % cols) * (cell_w + CELL_GAP)
        y0 = CELL_GAP + (k // cols) * (cell_h + CELL_GAP)
        verdict = judged.get(r["id"], {}).get("matches")
        mark = {True: " ok", False: " MISMATCH", None: ""}[verdict]
        draw.text((x0, y0), f"p{r['prompt_index']:03d} s{r['seed']}{mark if r['status'] == 'ok' else ' FAILED'}",
                  fill="black" if verdict is not False else "red")
        if r["id"] not in frames:
            draw.rectangle([x0, y0 + LABEL_H, x0 + cell_w - 1, y0 + cell_h - 1], fill=(160, 160, 160))
            continue
        v = frames[r["id"]]
        for j, t in enumerate((0, len(v) // 2, len(v) - 1)):  # first, middle, last
            img = Image.fromarray(v[t]).resize((w * scale, h * scale), Image.NEAREST)
            sheet.paste(img, (x0 + j * (w * scale + FRAME_GAP), y0 + LABEL_H))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    write_atomic(path, lambda f: f.write(buf.getvalue()))


def write_report(spec: SweepSpec, out: str | Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Write summary.json / .csv / .md and one contact sheet per setting into ``out``; return the summary."""
    out = Path(out)
    summary = summarize(spec, out, records)
    data = json.dumps(_safe(summary), indent=1, allow_nan=False).encode()
    write_atomic(out / "summary.json", lambda f: f.write(data))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in summary["settings"].values():
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_FIELDS})
    text = buf.getvalue().encode()
    write_atomic(out / "summary.csv", lambda f: f.write(text))
    md = markdown(spec, summary).encode()
    write_atomic(out / "summary.md", lambda f: f.write(md))
    for s in spec.settings:
        mine = [r for r in records if r["setting"] == s.name]
        contact_sheet(out, mine, summary["settings"][s.name].get("per_task", {}), out / contact_name(s.name))
    return summary
