"""Generate ``docs/benchmarks.md`` (and ``docs/img/*.png``) from the benchmark outputs under ``out/bench/``.

One section per benchmark, each from its own ``results.json`` / ``results.csv`` / PNGs: the command that
produces it, the hardware it ran on (the ``hardware`` record of ``bench_common.hardware()``), its table(s) and
plots. A benchmark whose outputs are absent gets its section with a note saying what to run. Sections known
here get tables of their chosen columns; any other output (a benchmark added later, or one whose format moved)
is shown as its CSV, whole. The wall-time-vs-budget plot is drawn here from the retention sweep (matplotlib's
object API, no pyplot state); timeline PNGs are copied, shrunk below ``MAX_PNG_BYTES`` when needed. Every
file is written atomically; the page holds no timestamps, so regenerating unchanged outputs changes nothing.

    .venv/bin/python benchmarks/results_page.py                     # out/bench -> docs/benchmarks.md
    .venv/bin/python benchmarks/results_page.py --bench DIR --docs DIR
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockrt.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]

MAX_PNG_BYTES = 200_000
PY = ".venv/bin/python"
MB = 1e6


@dataclass(frozen=True)
class Section:
    """A benchmark's part of the page: where its outputs are, the command writing them, how to render them."""

    key: str
    title: str
    subdir: str  # under the bench directory ("" = the bench directory itself)
    command: str
    render: Callable[["Ctx", Any], list[str]] | None  # None: the generic CSV table
    about: str = ""


@dataclass
class Ctx:
    """What a renderer needs: the section's output directory and where images go (``img(...)`` copies one)."""

    src: Path
    img_dir: Path
    key: str

    def img(self, name: str, alt: str) -> list[str]:
        """Copy ``src/name`` into the image directory (shrunk if large); the markdown line, or [] if absent."""
        path = self.src / name
        if not path.is_file():
            return []
        dest = self.img_dir / f"{self.key}_{name}"
        write_png(dest, path.read_bytes())
        return [f"![{alt}](img/{dest.name})", ""]


# -- formatting -----------------------------------------------------------------------------------------------


def fmt(v: Any, digits: int = 3) -> str:
    """A cell: '-' for missing, floats to ``digits`` significant figures, bools as yes/no."""
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf"
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"
    return str(v).replace("|", "\\|")


def mb(v: Any) -> str:
    return "-" if v is None or v == "" else f"{float(v) / MB:.0f}"


def margin(budget: float, used: float | None) -> str:
    """How far under the budget, or over it (to the kB: a few pages over is not rounded away)."""
    if used is None:
        return "not measured"
    left = budget - used
    return f"{left / MB:.1f} MB under the budget" if left >= 0 else f"**over the budget by {-left / 1e3:.0f} kB**"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table; cells already strings are kept, others go through ``fmt``."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(c.replace("|", "\\|") if isinstance(c, str) else fmt(c) for c in r) + " |"
            for r in rows]
    return out + [""]


def hardware_line(hw: dict[str, Any] | None) -> str:
    """``bench_common.hardware()``'s record in words, with the other-CPU probe when it was taken."""
    if not hw:
        return "not recorded in the outputs"
    threads = hw.get("torch_threads", "?")
    parts = [f"{hw.get('cpu', '?')}, {hw.get('cores', '?')} cores", f"torch {hw.get('torch', '?')}"
             f" ({threads} thread{'' if threads == 1 else 's'})", f"Python {hw.get('python', '?')}",
             hw.get("platform", "")]
    if hw.get("gpu"):
        parts.insert(1, f"GPU {hw['gpu']}")
    busy = hw.get("other_cpu_cores_during")
    if isinstance(busy, (int, float)):
        parts.append(f"other processes used {busy:.2f} cores during the run")
    return "; ".join(p for p in parts if p)


def targets(ts: Any) -> list[str]:
    if not isinstance(ts, list) or not ts:
        return []
    rows = [[t.get("name", ""), t.get("value_text") or fmt(t.get("value")), t.get("target", ""),
             t.get("verdict") or ("PASS" if t.get("pass") else "MISS")] for t in ts if isinstance(t, dict)]
    return ["Targets (measured, not asserted):", ""] + table(["target", "value", "wanted", ""], rows)


def include_md(path: Path) -> list[str]:
    """A benchmark's own markdown report, its title dropped and its headings moved two levels down."""
    out, fenced = [], False
    for i, line in enumerate(path.read_text().splitlines()):
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            if i == 0 and line.startswith("# "):
                continue
            line = "##" + line
        out.append(line)
    return out + [""]


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def in_mb(column: str) -> bool:
    """A CSV column of bytes (shown in MB): a name with "bytes" (not a ratio or fraction), an RSS delta, a budget."""
    return ("bytes" in column and not any(w in column for w in ("ratio", "fraction", "per_s"))) or \
        column.endswith("_delta") or column == "budget"


def csv_table(path: Path) -> list[str]:
    """The whole CSV as a markdown table (byte columns in MB)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return ["(empty CSV)", ""]
    cols = list(rows[0])

    def cell(k: str, v: str) -> str:
        try:
            x = float(v)
        except ValueError:
            return fmt(v)
        if in_mb(k):
            return mb(x)
        return fmt(int(x) if x.is_integer() and "." not in v else x, 5)

    heads = [f"{c} (MB)" if in_mb(c) else c for c in cols]
    return table(heads, [[cell(c, r.get(c) or "") for c in cols] for r in rows])


# -- PNGs -----------------------------------------------------------------------------------------------------


def write_png(dest: Path, data: bytes, limit: int = MAX_PNG_BYTES) -> None:
    """Write PNG bytes atomically, first reduced to a palette and downscaled until under ``limit`` bytes."""
    if len(data) > limit:
        from PIL import Image

        img = Image.open(io.BytesIO(data)).convert("RGB")
        scale = 1.0
        while True:
            size = (max(1, int(img.width * scale)), max(1, int(img.height * scale)))
            small = img.resize(size, Image.LANCZOS).quantize(colors=128)
            buf = io.BytesIO()
            small.save(buf, format="PNG", optimize=True)
            data = buf.getvalue()
            if len(data) <= limit or scale < 0.2:
                break
            scale *= 0.8
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dest, lambda f: f.write(data))


def budget_plot(runs: list[dict[str, Any]], baselines: dict[str, Any], dest: Path) -> bool:
    """Wall time per pass against the budget, per regime (measured with retention, predicted, no retention)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    regimes = sorted({r["regime"] for r in runs if r.get("mode") == "retention"})
    if not regimes:
        return False
    fig = Figure(figsize=(6.4, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, regime in enumerate(regimes):
        rs = sorted((r for r in runs if r.get("regime") == regime and r.get("mode") == "retention"),
                    key=lambda r: r["budget"])
        x = [r["budget"] / MB for r in rs]
        color = f"C{i}"
        ax.plot(x, [r["wall_s_per_pass"] * 1e3 for r in rs], "o-", color=color, label=f"{regime}: measured")
        if all(r.get("predicted_s_per_pass") is not None for r in rs):
            ax.plot(x, [r["predicted_s_per_pass"] * 1e3 for r in rs], "--", color=color, alpha=0.6,
                    label=f"{regime}: predicted")
        base = (baselines.get(regime) or {}).get("wall_s_per_pass")
        if base is not None:
            ax.axhline(base * 1e3, color=color, linestyle=":", alpha=0.7, label=f"{regime}: no retention")
    ax.set_xlabel("budget (MB)")
    ax.set_ylabel("wall time per pass (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_png(dest, buf.getvalue())
    return True


# -- the known benchmarks ------------------------------------------------------------------------------------


def render_fullscale(ctx: Ctx, d: dict[str, Any]) -> list[str]:
    g, p = d["generate"], d["process"]
    out = [f"Budget `{d['budget']}` ({d['budget_bytes'] / MB:.0f} MB), weights `{d['size']}` (random values in the "
           f"real layout), {g['resolution']} {g['aspect']}, {g['frames']} frames, {g['steps']} steps, LPL at "
           f"{g['lpl']}: {g['steps_run']} STDiT3 calls; loads "
           f"{'throttled to ' + str(d['run_config']['device_profile']) if d['run_config'].get('device_profile') else 'unthrottled (page cache / disk)'}.",
           ""]
    rows = [[r["stage"], f"{r['params'] / 1e9:.3f}", r["blocks"], r.get("retained"), r["passes"], f"{r['stage_s']:.1f}",
             f"{r['wall_s']:.1f}", f"{r['load_s']:.1f}", f"{r['compute_s']:.1f}", fmt(r["roofline_ratio"]),
             f"{r['bytes_loaded'] / 1e9:.2f}", mb(r["peak_ledger_bytes"]), mb(r["peak_rss_delta"]),
             mb(r["peak_anon_delta"]), mb(r["peak_file_delta"]), "yes" if r["ledger_ok"] else "**no**"]
            for r in d["rows"]]
    out += table(["stage", "params (B)", "blocks", "retained", "passes", "stage s", "pass s", "load s", "compute s",
                  "`roofline_ratio`", "loaded (GB)", "peak ledger (MB)", "RSS delta (MB)", "anon (MB)",
                  "file-backed (MB)", "ledger ≤ budget"], rows)
    pk, whole, budget = p.get("at_rss_peak") or {}, d["rows"][-1], d["budget_bytes"]
    out += [f"Whole run, {whole['stage_s']:.0f} s: peak ledger {mb(whole['peak_ledger_bytes'])} MB; anonymous memory "
            f"grew {mb(whole['peak_anon_delta'])} MB ({margin(budget, whole['peak_anon_delta'])}), the whole RSS "
            f"{mb(whole['peak_rss_delta'])} MB ({margin(budget, whole['peak_rss_delta'])}). The process held "
            f"{mb(p.get('rss_before_bytes'))} MB before the run (interpreter and libraries) and "
            f"{mb(p.get('peak_rss_bytes'))} MB at its peak."]
    if pk:
        out[-1] += (f" At the RSS peak the ledger held {mb(pk.get('ledger_bytes'))} MB and RSS had grown "
                    f"{mb(pk.get('rss_delta'))} MB: {mb(pk.get('beyond_ledger'))} MB that no ledger counts "
                    f"({mb(pk.get('file_delta'))} MB of it clean file-backed pages; the rest allocator slack, kernel "
                    "scratch, thread stacks, tensors held between stages).")
    out += ["", "*stage s*: from the previous stage's end (model set-up included); *pass s*: the streamed passes; "
            "RSS deltas per stage from that stage's runtime start; *retained*: blocks kept resident at the end."]
    if d.get("stray_prefetch_bytes"):
        out[-1] += (f" The whole run's bytes loaded include {mb(d['stray_prefetch_bytes'])} MB of block-0 prefetches "
                    "for passes that never came (each stage's last prefetch); the stage rows leave them out.")
    out += [""]
    return out + ctx.img("timeline.png", "whole-run timeline")


def render_overlap(ctx: Ctx, d: dict[str, Any]) -> list[str]:
    c = d["config"]
    out = [f"ToyTransformer dim {c['dim']}, {c['blocks']} blocks of {c['block_bytes'] / MB:.1f} MB, {c['tokens']} "
           f"tokens, loads throttled to {c['read_bytes_per_s'] / 1e9:.2f} GB/s, {c['passes']} passes.", ""]
    rows = [[name, f"{m['wall_s_per_pass'] * 1e3:.0f}", fmt(m.get("stall_fraction")), fmt(m.get("roofline_ratio")),
             mb(m.get("peak_ledger_bytes")), mb(m.get("budget")), mb(m.get("peak_rss_delta"))]
            for name, m in d["modes"].items()]
    out += table(["mode", "wall/pass (ms)", "`stall_fraction`", "`roofline_ratio`", "peak ledger (MB)",
                  "budget (MB)", "`peak_rss_delta` (MB)"], rows)
    sp = d.get("speedups") or {}
    out += [", ".join(f"{k.replace('_', ' ')}: {v:.2f}×" for k, v in sp.items()), ""]
    return out + targets(d.get("targets")) + ctx.img("timeline_prefetch.png", "prefetch timeline")


def render_retention(ctx: Ctx, d: dict[str, Any]) -> list[str]:
    c = d["config"]
    out = [f"ToyTransformer dim {c['dim']}, {c['blocks']} blocks of {c['block_bytes'] / MB:.1f} MB, loads at "
           f"{c['read_bytes_per_s'] / 1e9:.2f} GB/s, {c['passes']} passes, steady state from pass "
           f"{c['steady_from_pass']}; tokens: " + ", ".join(f"{k} {v}" for k, v in c["tokens"].items()) + ".", ""]
    rows = [[r["regime"], r["mode"], mb(r["budget"]), f"{r['retained_blocks']}/{r['blocks']}",
             f"{r['wall_s_per_pass'] * 1e3:.0f}", fmt(r.get("wall_vs_no_retention")), fmt(r.get("roofline_ratio")),
             fmt(r.get("prediction_error_pct"), 2), fmt(r.get("rebased_error_pct"), 2), mb(r.get("peak_ledger_bytes")),
             mb(r.get("peak_anon_delta"))] for r in d["runs"]]
    out += table(["regime", "mode", "budget (MB)", "retained", "wall/pass (ms)", "vs no retention",
                  "`roofline_ratio`", "predicted err %", "re-based err %", "peak ledger (MB)", "anon (MB)"], rows)
    out += targets(d.get("targets"))
    dest = ctx.img_dir / f"{ctx.key}_wall_vs_budget.png"
    if budget_plot(d["runs"], d.get("baselines") or {}, dest):
        out += [f"![wall time per pass against the budget](img/{dest.name})", ""]
    for regime in ("load-bound", "balanced"):
        out += ctx.img(f"timeline_{regime}_half.png", f"{regime}, half-model budget, retention")
    return out


def render_generate(ctx: Ctx, d: dict[str, Any]) -> list[str]:
    c = d["config"]
    out = [f"{c['resolution']} {c['aspect']}, {c['frames']} frames, {c['steps']} steps, budget {c['budget']}; "
           "models: small random-weight STDiT3, tiny T5 and VAE.", ""]
    rows = [[name, fmt(r.get("stream")), r.get("model_calls"), fmt(r.get("stdit_wall_s")), fmt(r.get("speedup")),
             fmt(r.get("psnr_db")), fmt(r.get("ssim"), 4), mb(r.get("peak_ledger_bytes")), mb(r.get("peak_anon_delta"))]
            for name, r in d["rows"].items()]
    out += table(["row", "streamed", "STDiT3 calls", "STDiT3 wall (s)", "speedup", "PSNR (dB)", "SSIM",
                  "peak ledger (MB)", "anon (MB)"], rows)
    defs = d.get("definitions") or {}
    return out + [f"*{k}*: {v}." for k, v in defs.items()] + [""]


def render_stdit3(ctx: Ctx, d: list[dict[str, Any]]) -> list[str]:
    rows = [[fmt(r["retention"]), r["pass"], f"{r['wall_s']:.2f}", f"{r['load_s']:.2f}", f"{r['compute_s']:.2f}",
             fmt(r["roofline_ratio"]), mb(r["bytes_loaded"]), mb(r["bytes_reused"]), r.get("retained_blocks")]
            for r in d]
    out = table(["retention", "pass", "wall s", "load s", "compute s", "`roofline_ratio`", "loaded (MB)",
                 "reused (MB)", "retained"], rows)
    for r in {str(r["retention"]): r for r in d}.values():
        out += [f"retention {fmt(r['retention'])}: peak ledger {mb(r['peak_ledger_bytes'])} of {mb(r['budget'])} MB; "
                f"`peak_rss_delta` {mb(r.get('peak_rss_delta'))} MB (anon {mb(r.get('peak_anon_delta'))}, file-backed "
                f"{mb(r.get('peak_file_delta'))}).", ""]
    return out + ctx.img("timeline_retention.png", "STDiT3 streamed with retention")


SECTIONS: tuple[Section, ...] = (
    Section("fullscale", "Full-size Open-Sora v1.2 under 3.3 GB", "fullscale", f"{PY} benchmarks/fullscale.py",
            render_fullscale, "T5-v1.1-XXL, STDiT3-XL/2 and the VAE v1.2 (random weights in the real layout, "
            "25 GB of fp32), prompt to mp4, every model streamed under one budget."),
    Section("overlap", "Overlap: does prefetch hide the loads?", "", f"{PY} benchmarks/overlap.py --out out/bench",
            render_overlap),
    Section("retention", "Retention: wall time against the budget", "retention", f"{PY} benchmarks/retention.py",
            render_retention),
    Section("generate", "LPL / TDTM speedups of the STDiT stage", "generate", f"{PY} benchmarks/generate_speedups.py",
            render_generate),
    Section("stdit3", "Full-size STDiT3-XL/2 alone", "stdit3", f"{PY} benchmarks/stdit3_fullsize.py", render_stdit3),
    Section("peers", "blockrt against its peers", "peers", "", None,
            "accelerate, diffusers group offloading, sequential loading and blockrt on the same model and budget."),
    Section("decode", "Token-by-token generation: blockrt against its peers and the physical limit", "decode", "",
            None, "A Llama-shaped checkpoint generating greedily at budgets of its weights' bytes, warm and cold, "
            "each contender in a fresh process (`benchmarks/decode.py`; the command the results record)."),
    Section("storage", "Storage dtypes for blocks", "storage", "", None,
            "fp32 / fp16 / bf16 / int8 block storage: bytes loaded and the quality cost."),
    Section("coreml", "Core ML export of the blocks", "coreml", "", None),
    Section("quality", "LPL / TDTM quality on the trained shapes model", "quality",
            f"{PY} benchmarks/quality.py --threads 2", None),
)


def command_for(section: Section, data: Any, bench_root: Path) -> str:
    """The section's command: its own, the one its results record, or the benchmark script writing there."""
    if section.command:
        return section.command
    if isinstance(data, dict) and isinstance(data.get("command"), str):
        return data["command"]
    patterns = (f'"out/bench/{section.subdir}"', f'"bench" / "{section.subdir}"')
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        if script.name != Path(__file__).name and any(p in script.read_text(errors="replace") for p in patterns):
            return f"{PY} benchmarks/{script.name}"
    return ""


def render_section(section: Section, bench: Path, img_dir: Path) -> list[str]:
    src = bench / section.subdir if section.subdir else bench
    shown = f"out/bench/{section.subdir}" if section.subdir else "out/bench"  # where the command writes
    data = read_json(src / "results.json")
    cmd = command_for(section, data, bench)
    out = [f"## {section.title}", ""]
    if section.about:
        out += [section.about, ""]
    out += [f"Command: `{cmd}`" if cmd else f"Command: none yet (no script under `benchmarks/` writes `{shown}`).", ""]
    if data is None and not (src / "results.csv").is_file():
        return out + [f"*Not measured: no `results.json` or `results.csv` under `{shown}`."
                      + (" Run the command above, then regenerate this page.*" if cmd else "*"), ""]
    hw = data.get("hardware") if isinstance(data, dict) else None
    out += [f"Hardware: {hardware_line(hw)}.", ""]
    ctx = Ctx(src, img_dir, section.key)
    if section.render is not None and data is not None:
        try:
            return out + section.render(ctx, data)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            out += [f"*(the results' format is not the one this page knows ({type(e).__name__}: {e}); "
                    "shown as the CSV)*", ""]
    reports = sorted(src.glob("*.md"))
    if reports:  # the benchmark's own tables
        out += include_md(reports[0])
    elif (src / "results.csv").is_file():
        out += csv_table(src / "results.csv")
    if isinstance(data, dict) and not reports:
        out += targets(data.get("targets"))
    for png in sorted(src.glob("*.png"))[:4]:
        out += ctx.img(png.name, png.stem.replace("_", " "))
    return out


def previous_sections(page: Path) -> dict[str, list[str]]:
    """The ``## `` sections of an existing page by title (their lines, the heading included)."""
    out: dict[str, list[str]] = {}
    title = None
    for line in page.read_text().splitlines() if page.is_file() else []:
        if line.startswith("## "):
            title = line[3:]
            out[title] = []
        if title is not None:
            out[title].append(line)
    return out


def build_page(bench: Path, docs: Path, keep: bool = True) -> str:
    """Render every section from ``bench`` into ``docs/benchmarks.md`` (images in ``docs/img``); returns the text.
    ``keep``: a section whose outputs ``bench`` lacks keeps its text from the page already there (``out/`` is not
    kept between machines; a benchmark rerun replaces only its own section)."""
    img_dir = docs / "img"
    before = previous_sections(docs / "benchmarks.md") if keep else {}
    lines = ["# Benchmarks", "",
             "Generated by `benchmarks/results_page.py` from the outputs under `out/bench/`; do not edit by hand, "
             f"regenerate with `{PY} benchmarks/results_page.py`. Timings on the shared 2-core dev machine move "
             "±15–20 % between runs: compare the ratios measured within one run. All weights are random values in "
             "the real layouts (no real checkpoints are available here).", ""]
    known = {s.subdir for s in SECTIONS}
    others = tuple(Section(d.name, f"Other outputs: `{d.name}`", d.name, "", None)
                   for d in sorted(bench.iterdir()) if d.is_dir() and d.name not in known
                   and isinstance((read_json(d / "results.json") or {}), dict)
                   and "hardware" in (read_json(d / "results.json") or {}))
    others += tuple(Section(t, t, t[len("Other outputs: `"):-1], "", None) for t in before  # kept from the page
                    if t.startswith("Other outputs: `") and t not in {o.title for o in others})
    lines += [f"- [{s.title}](#{anchor(s.title)})" for s in SECTIONS + others] + [""]
    for s in SECTIONS + others:
        part = render_section(s, bench, img_dir)
        measured = not any(line.startswith("*Not measured") for line in part)
        lines += part if measured or s.title not in before else before[s.title]
    text = "\n".join(lines).rstrip() + "\n"
    docs.mkdir(parents=True, exist_ok=True)
    write_atomic(docs / "benchmarks.md", lambda f: f.write(text.encode()))
    return text


def anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    keep = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_")
    return keep.replace(" ", "-")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", default="out/bench", help="where the benchmarks wrote their outputs")
    ap.add_argument("--docs", default="docs", help="where benchmarks.md and img/ go")
    ap.add_argument("--drop-missing", action="store_true",
                    help="sections without outputs under --bench say so, instead of keeping the page's earlier text")
    args = ap.parse_args(argv)
    bench = Path(args.bench)
    if not bench.is_dir():
        print(f"no benchmark outputs at {bench}: run the benchmarks first (make bench, ...)", file=sys.stderr)
        return 1
    text = build_page(bench, Path(args.docs), keep=not args.drop_missing)
    print(f"wrote {Path(args.docs) / 'benchmarks.md'} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
