"""The PNG timeline of a Profile, in the style of the On-device Sora paper's Figures 8 and 14.

Top: one lane per thread (compute first) with a bar per compute and load event, waits in red, evictions as
ticks, pass boundaries as dotted lines. Bottom, on the same time axis: ``ledger_bytes`` (and RSS growth when
recorded) in GB under a dashed line at the budget. matplotlib is imported only inside :func:`plot_timeline`,
and draws on a bare ``Figure`` with the Agg canvas: no pyplot state, no global backend switch.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from .budget import format_bytes
from .files import write_atomic

COLORS = {"compute": "#4C72B0", "load": "#DD8452", "wait": "#D62728", "evict": "#333333"}
FIG_SIZE = (12.0, 5.0)  # inches
DPI = 120
LABEL_FONT = 7  # points
CHAR_PX = LABEL_FONT * 0.65 * DPI / 72  # rough width of one label character in pixels


class Recorded(Protocol):
    """What the timeline reads of a :class:`blockrt.profile.Profile`, typed by shape: imports run one way."""

    budget: int | None

    @property
    def events(self) -> list[Any]: ...  # Events: kind, block, start, end, lane

    @property
    def passes(self) -> list[tuple[int, float, float]]: ...

    @property
    def counters(self) -> dict[str, list[tuple[float, float]]]: ...

    def summary(self) -> Any: ...  # a Summary: passes, roofline_ratio, stall_fraction


def _short(block: str) -> str:
    """The tail of a dotted block name, which is what fits in a bar ("encoder.block.3" -> "block.3")."""
    parts = block.split(".")
    return ".".join(parts[-2:]) if len(parts) > 2 else block


def plot_timeline(profile: Recorded, path: str | os.PathLike[str], title: str | None = None) -> None:
    """Write the timeline of ``profile`` as a PNG at ``path`` (atomically); ``title`` defaults to the pass
    count and the roofline ratio."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    events, passes, counters = profile.events, profile.passes, profile.counters
    summary = profile.summary()
    lanes = sorted({ev.lane for ev in events} | {"compute"}, key=lambda n: (n != "compute", n))
    y_of = {name: len(lanes) - 1 - i for i, name in enumerate(lanes)}  # compute lane on top

    times = [t for ev in events for t in (ev.start, ev.end)]
    times += [t for _, s, e in passes for t in (s, e)]
    times += [t for series in counters.values() for t, _ in series]
    x0, x1 = (min(times), max(times)) if times else (0.0, 1.0)
    span = (x1 - x0) or 1.0

    fig = Figure(figsize=FIG_SIZE, dpi=DPI, layout="constrained")
    ax, mem = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    axes_px = FIG_SIZE[0] * DPI * 0.85  # the lane axes' width in pixels, roughly

    for lane in lanes:
        y = y_of[lane]
        for kind, height in (("compute", 0.6), ("load", 0.6), ("wait", 0.3)):
            bars = [ev for ev in events if ev.lane == lane and ev.kind == kind]
            if not bars:
                continue
            ax.broken_barh([(ev.start, ev.end - ev.start) for ev in bars], (y - height / 2, height),
                           facecolors=COLORS[kind], edgecolors="white", linewidth=0.4, zorder=2 + (kind == "wait"))
            if kind == "wait":
                continue
            for ev in bars:  # a label only where it fits inside its bar
                label = _short(ev.block)
                if (ev.end - ev.start) / span * axes_px >= CHAR_PX * len(label) + 4:
                    ax.text((ev.start + ev.end) / 2, y, label, ha="center", va="center",
                            fontsize=LABEL_FONT, color="white", clip_on=True, zorder=4)
        evicts = [ev.start for ev in events if ev.lane == lane and ev.kind == "evict"]
        if evicts:
            ax.vlines(evicts, y - 0.4, y + 0.4, colors=COLORS["evict"], linewidth=0.8, zorder=4)

    for idx, s, e in passes:
        for a in (ax, mem):
            a.axvline(s, color="grey", linewidth=0.6, linestyle=":", zorder=1)
            a.axvline(e, color="grey", linewidth=0.6, linestyle=":", zorder=1)
        ax.text(s, len(lanes) - 0.45, f" pass {idx}", fontsize=LABEL_FONT, va="bottom", color="grey")

    ax.set_yticks([y_of[n] for n in lanes], lanes)
    ax.set_ylim(-0.6, len(lanes) - 0.2)
    ax.set_xlim(x0 - 0.01 * span, x1 + 0.01 * span)
    ax.legend(handles=[Patch(color=COLORS[k], label=k) for k in ("compute", "load", "wait", "evict")],
              loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=LABEL_FONT, ncol=4, frameon=False)
    if title is None:
        title = f"blockrt timeline: {summary.passes} pass{'' if summary.passes == 1 else 'es'}, " \
                f"roofline_ratio {summary.roofline_ratio:.2f}, stall_fraction {summary.stall_fraction:.3f}"
    ax.set_title(title, fontsize=10, loc="left")

    drawn = False
    # the ledger is absolute; RSS is drawn as growth over the baseline (the first sample), anonymous memory
    # (what a phone counts) when it was sampled apart from file-backed pages, else the total
    rss_name = "rss_anon_bytes" if counters.get("rss_anon_bytes") else "rss_bytes"
    for name, color, label in (("ledger_bytes", "#4C72B0", "ledger_bytes"),
                               (rss_name, "#55A868", f"{rss_name.removesuffix('_bytes')} - baseline")):
        series = sorted(counters.get(name, []))
        if series:
            base = series[0][1] if name != "ledger_bytes" else 0.0
            series.append((max(x1, series[-1][0]), series[-1][1]))  # the last value holds to the end
            mem.step([t for t, _ in series], [(v - base) / 1e9 for _, v in series], where="post",
                     color=color, linewidth=1.0, label=label)
            drawn = True
    if profile.budget:
        mem.axhline(profile.budget / 1e9, color=COLORS["wait"], linestyle="--", linewidth=1.0,
                    label=f"budget {format_bytes(profile.budget)}")
        drawn = True
    if drawn:
        mem.legend(loc="lower right", fontsize=LABEL_FONT, ncol=3)
    else:
        mem.text(0.5, 0.5, "no memory counter recorded", transform=mem.transAxes, ha="center", color="grey")
    mem.set_ylim(bottom=0)
    mem.set_ylabel("memory (GB)")
    mem.set_xlabel("time (s)")

    write_atomic(path, lambda f: fig.savefig(f, format="png"))
