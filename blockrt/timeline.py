"""The PNG timeline of a Profile, in the style of the On-device Sora paper's Figures 8 and 14.

Three rows on one time axis:

- top, a strip naming what runs when: the stages of a multi-stage run (``T5``, ``STDiT3``, ``VAE``: each a
  colour, shaded through the rows below and keyed in the legend with its duration) and the pass numbers,
  each written only where it fits, so nothing overprints;
- middle, one lane per thread (compute first) with a bar per compute and load event (bars too thin to see
  keep a one-pixel minimum), waits in red, evictions as ticks above the bar, pass boundaries dotted;
- bottom, ``ledger_bytes`` (and RSS growth when recorded) under a dashed line at the budget, in the unit that
  fits (kB, MB or GB).

Legends sit outside the plotting area, right of it, so they never cover a line. matplotlib is imported only
inside :func:`plot_timeline`, and draws on a bare ``Figure`` with the Agg canvas: no pyplot state, no global
backend switch.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from .budget import format_bytes
from .files import write_atomic

COLORS = {"compute": "#4C72B0", "load": "#DD8452", "wait": "#D62728", "evict": "#333333"}
STAGE_COLORS = ("#8172B3", "#55A868", "#C44E52", "#CCB974", "#64B5CD", "#937860")  # one per stage, cycled
FIG_SIZE = (13.0, 5.5)  # inches
DPI = 120
LABEL_FONT = 7  # points
CHAR_PX = LABEL_FONT * 0.62 * DPI / 72  # rough width of one label character in pixels
AXES_FRACTION = 0.80  # the plotting area's share of the figure width (the legends take the rest)
THIN_PX = 3.0  # bars narrower than this are drawn without a white edge, so they stay visible
UNITS = (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1.0))


class Recorded(Protocol):
    """What the timeline reads of a :class:`blockrt.profile.Profile`, typed by shape: imports run one way."""

    budget: int | None

    @property
    def events(self) -> list[Any]: ...  # Events: kind, block, start, end, lane

    @property
    def passes(self) -> list[tuple[int, float, float]]: ...

    @property
    def counters(self) -> dict[str, list[tuple[float, float]]]: ...

    @property
    def stages(self) -> list[Any]: ...  # Stages: name, prefix, start, end

    def summary(self) -> Any: ...  # a Summary: passes, roofline_ratio, stall_fraction


def _short(block: str) -> str:
    """The tail of a dotted block name, which is what fits in a bar ("t5/encoder.block.3" -> "block.3")."""
    parts = block.rsplit("/", 1)[-1].split(".")
    return ".".join(parts[-2:]) if len(parts) > 2 else ".".join(parts)


def memory_unit(peak: float) -> tuple[str, float]:
    """The decimal unit a memory axis reaching ``peak`` bytes reads best in: ``(name, bytes per unit)``."""
    return next(((name, scale) for name, scale in UNITS if peak >= scale), UNITS[-1])


def _fitting(spans: list[tuple[float, float, list[str]]], px_per_s: float, gap_px: float = 3.0) -> list[tuple[float, str]]:
    """For ``(start, end, candidate labels)`` in time order: ``(centre, label)`` with the first candidate that fits
    inside its span and clears the previous label; spans where none fits get no label."""
    out: list[tuple[float, str]] = []
    right = -float("inf")  # right edge of the last label, in pixels
    for start, end, candidates in spans:
        width = (end - start) * px_per_s
        centre = (start + end) / 2
        for text in candidates:
            w = CHAR_PX * len(text) + gap_px
            if w <= width and centre * px_per_s - w / 2 >= right:
                out.append((centre, text))
                right = centre * px_per_s + w / 2
                break
    return out


def plot_timeline(profile: Recorded, path: str | os.PathLike[str], title: str | None = None) -> None:
    """Write the timeline of ``profile`` as a PNG at ``path`` (atomically); ``title`` defaults to the pass
    count and the roofline ratio."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    events, passes, counters = profile.events, profile.passes, profile.counters
    stages = list(getattr(profile, "stages", []))
    summary = profile.summary()
    lanes = sorted({ev.lane for ev in events} | {"compute"}, key=lambda n: (n != "compute", n))
    y_of = {name: len(lanes) - 1 - i for i, name in enumerate(lanes)}  # compute lane on top

    times = [t for ev in events for t in (ev.start, ev.end)]
    times += [t for _, s, e in passes for t in (s, e)]
    times += [t for series in counters.values() for t, _ in series]
    x0, x1 = (min(times), max(times)) if times else (0.0, 1.0)
    span = (x1 - x0) or 1.0
    px_per_s = FIG_SIZE[0] * DPI * AXES_FRACTION / (span * 1.02)

    fig = Figure(figsize=FIG_SIZE, dpi=DPI, layout="constrained")
    top, ax, mem = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [0.45, 2, 1]})

    # -- top strip: stages (row 1) and pass numbers (row 0) --------------------------------------------------
    stage_handles = []
    for i, st in enumerate(stages):
        color = STAGE_COLORS[i % len(STAGE_COLORS)]
        top.broken_barh([(st.start, st.end - st.start)], (1.05, 0.9), facecolors=color, edgecolors="none")
        for a in (ax, mem):
            a.axvspan(st.start, st.end, color=color, alpha=0.07, linewidth=0, zorder=0)
        stage_handles.append(Patch(color=color, label=f"{st.name} ({st.end - st.start:.1f} s)"))
    for centre, text in _fitting([(st.start, st.end, [st.name]) for st in stages], px_per_s):
        top.text(centre, 1.5, text, ha="center", va="center", fontsize=LABEL_FONT + 1, color="white",
                 fontweight="bold", clip_on=True)
    pass_spans = sorted((s, e, [f"pass {i}", str(i)]) for i, s, e in passes)
    for centre, text in _fitting(pass_spans, px_per_s):
        top.text(centre, 0.5, text, ha="center", va="center", fontsize=LABEL_FONT, color="dimgrey", clip_on=True)
    for _, s, _ in passes:
        top.vlines(s, 0.1, 0.9, colors="grey", linewidth=0.5)
    top.set_ylim(0, 2)
    top.set_yticks([0.5, 1.5] if stages else [0.5], ["passes", "stages"] if stages else ["passes"])
    top.tick_params(axis="y", length=0, labelsize=LABEL_FONT + 1)
    top.tick_params(axis="x", length=0)
    for side in ("top", "right", "left", "bottom"):
        top.spines[side].set_visible(False)
    if stage_handles:
        top.legend(handles=stage_handles, loc="upper left", bbox_to_anchor=(1.005, 1.25), fontsize=LABEL_FONT,
                   frameon=False, title="stages", title_fontsize=LABEL_FONT)

    # -- lanes -----------------------------------------------------------------------------------------------
    for lane in lanes:
        y = y_of[lane]
        for kind, height in (("compute", 0.6), ("load", 0.6), ("wait", 0.3)):
            bars = [ev for ev in events if ev.lane == lane and ev.kind == kind]
            if not bars:
                continue
            wide = [ev for ev in bars if (ev.end - ev.start) * px_per_s >= THIN_PX]
            thin = [ev for ev in bars if (ev.end - ev.start) * px_per_s < THIN_PX]
            z = 2 + (kind == "wait")
            if wide:
                ax.broken_barh([(ev.start, ev.end - ev.start) for ev in wide], (y - height / 2, height),
                               facecolors=COLORS[kind], edgecolors="white", linewidth=0.4, zorder=z)
            if thin:  # an edge in the bar's own colour: at least a pixel wide
                ax.broken_barh([(ev.start, ev.end - ev.start) for ev in thin], (y - height / 2, height),
                               facecolors=COLORS[kind], edgecolors=COLORS[kind], linewidth=0.5, zorder=z)
            if kind == "wait":
                continue
            for ev in wide:  # a label only where it fits inside its bar
                label = _short(ev.block)
                if (ev.end - ev.start) * px_per_s >= CHAR_PX * len(label) + 4:
                    ax.text((ev.start + ev.end) / 2, y, label, ha="center", va="center",
                            fontsize=LABEL_FONT, color="white", clip_on=True, zorder=4)
        evicts = [ev.start for ev in events if ev.lane == lane and ev.kind == "evict"]
        if evicts:  # short ticks above the bar, not across it
            ax.vlines(evicts, y + 0.32, y + 0.45, colors=COLORS["evict"], linewidth=0.6, zorder=4)

    for _, s, e in passes:
        for a in (ax, mem):
            a.axvline(s, color="grey", linewidth=0.5, linestyle=":", zorder=1)
            a.axvline(e, color="grey", linewidth=0.5, linestyle=":", zorder=1)

    ax.set_yticks([y_of[n] for n in lanes], lanes)
    ax.set_ylim(-0.6, len(lanes) - 0.45)
    ax.set_xlim(x0 - 0.01 * span, x1 + 0.01 * span)
    ax.legend(handles=[Patch(color=COLORS[k], label=k) for k in ("compute", "load", "wait", "evict")],
              loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=LABEL_FONT, frameon=False)
    if title is None:
        title = f"blockrt timeline: {summary.passes} pass{'' if summary.passes == 1 else 'es'}, " \
                f"roofline_ratio {summary.roofline_ratio:.2f}, stall_fraction {summary.stall_fraction:.3f}"
    top.set_title(title, fontsize=10, loc="left")

    # -- memory ----------------------------------------------------------------------------------------------
    # the ledger is absolute; RSS is drawn as growth over the baseline (the first sample), anonymous memory
    # (what a phone counts) when it was sampled apart from file-backed pages, else the total
    rss_name = "rss_anon_bytes" if counters.get("rss_anon_bytes") else "rss_bytes"
    lines = []
    for name, color, label in (("ledger_bytes", "#4C72B0", "ledger_bytes"),
                               (rss_name, "#55A868", f"{rss_name.removesuffix('_bytes')} - baseline")):
        series = sorted(counters.get(name, []))
        if series:
            base = series[0][1] if name != "ledger_bytes" else 0.0
            series.append((max(x1, series[-1][0]), series[-1][1]))  # the last value holds to the end
            lines.append(([t for t, _ in series], [v - base for _, v in series], color, label))
    peak = max([max(v) for _, v, _, _ in lines] + [profile.budget or 0, 1.0])
    unit, scale = memory_unit(peak)
    for ts, vs, color, label in lines:
        mem.step(ts, [v / scale for v in vs], where="post", color=color, linewidth=1.0, label=label)
    if profile.budget:
        mem.axhline(profile.budget / scale, color=COLORS["wait"], linestyle="--", linewidth=1.0,
                    label=f"budget {format_bytes(profile.budget)}")
    if lines or profile.budget:
        mem.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=LABEL_FONT, frameon=False)
    else:
        mem.text(0.5, 0.5, "no memory counter recorded", transform=mem.transAxes, ha="center", color="grey")
    mem.set_ylim(0, peak / scale * 1.08)
    mem.set_ylabel(f"memory ({unit})")
    mem.set_xlabel("time (s)")

    write_atomic(path, lambda f: fig.savefig(f, format="png"))
