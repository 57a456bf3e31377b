"""Tables, targets and the markdown page of the peer comparison (``benchmarks/peers.py``)."""

from __future__ import annotations

import statistics
from typing import Any

MB = 1e6
TARGET_WARM_VS_RESIDENT = 1.05  # issue 7: warm <= 1.05x resident
TARGET_THROTTLED_ROOFLINE = 1.05  # throttled <= 1.05x max(load, compute)
TARGET_RSS_OVER_IMPORTS = 250 * MB  # peak RSS <= imports + 250 MB
STILL_CACHED = 0.05  # share of a contender's files cached after a drop beyond what it holds: not read cold
NOISE_FLOOR = 0.95  # a streamed contender faster than this x resident means the machine's load changed mid-run
PEERS = ("accelerate_disk_offload", "accelerate_device_map", "diffusers_group_offload",
         "diffusers_group_offload_stream", "blockrt_sequential")
CSV_FIELDS = ("model", "regime", "contender", "status", "setup_s", "wall_per_pass", "vs_resident", "blockrt_speedup",
              "roofline_ratio", "load_only_s", "streamed_bytes_per_pass", "peak_rss_passes", "peak_anon_passes",
              "peak_file_passes", "peak_rss_with_setup", "baseline_rss", "cached_after_drop", "parity_equal", "max_abs_err")


def _peak_with_setup(r: dict[str, Any]) -> int | None:
    if "passes_peak" not in r:
        return None
    return max(r["passes_peak"]["rss"], r.get("setup_peak", {}).get("rss", 0))


def _status(r: dict[str, Any]) -> str:
    if r.get("na"):
        return r["na"]
    if r.get("error"):
        return "failed: " + r["error"].splitlines()[0][:160]
    return "ok"


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One CSV row per (model, regime, contender)."""
    out = []
    for model, m in results["models"].items():
        for regime, res in m["regimes"].items():
            for name, r in res.items():
                p = r.get("passes_peak") or {}
                par = r.get("parity") or {}
                out.append({"model": model, "regime": regime, "contender": name, "status": _status(r),
                            "setup_s": r.get("setup_s"), "wall_per_pass": r.get("wall_per_pass"),
                            "vs_resident": r.get("vs_resident"), "blockrt_speedup": r.get("blockrt_speedup"),
                            "roofline_ratio": r.get("roofline_ratio"), "load_only_s": r.get("load_only_s"),
                            "streamed_bytes_per_pass": r.get("streamed_bytes_per_pass"),
                            "peak_rss_passes": p.get("rss"), "peak_anon_passes": p.get("anon"),
                            "peak_file_passes": p.get("file"), "peak_rss_with_setup": _peak_with_setup(r),
                            "baseline_rss": r.get("baseline_rss"), "cached_after_drop": r.get("cached_after_drop"),
                            "parity_equal": par.get("equal"),
                            "max_abs_err": par.get("max_abs_err")})
    return out


def _f(v: Any, fmt: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v / scale, fmt)


def _parity(r: dict[str, Any]) -> str:
    par = r.get("parity")
    if not par:
        return "-"
    return "torch.equal" if par["equal"] else f"max|err| {_f(par['max_abs_err'], '.3g')}"


def not_cold(res: dict[str, dict[str, Any]]) -> list[str]:
    """Notes on contenders whose files stayed in the page cache although dropped before every pass."""
    out = []
    for n, r in res.items():
        files = (r.get("load_probe") or {}).get("bytes") or 0
        cached = (r.get("cached_after_drop") or 0.0) * files
        kept = max(0, files - r.get("streamed_bytes_per_pass", 0))  # file bytes it does not stream (held in memory)
        if files and cached > kept + STILL_CACHED * files:
            out.append(f"note: {n}: {cached / MB:.0f} MB of its {files / MB:.0f} MB of files stayed in the page cache "
                       "after each drop, more than the part it holds in memory (pages a process keeps mapped cannot "
                       "be dropped): some of its cold reads came from memory")
    return out


WHOLE_MODEL_SHARE = 0.8  # a set-up peak above this share of the model's bytes: the whole model was in memory
EXTRA_STREAMED = 1.02  # streaming more than this x the model's bytes per pass: something is read twice


def findings(model_bytes: int, res: dict[str, dict[str, Any]]) -> list[str]:
    """Behaviours the measurements show (not assumed): whole-model set-up, extra bytes, mmap'd weights."""
    out = []
    for n, r in res.items():
        if n == "resident" or "passes_peak" not in r:
            continue
        setup = r["setup_peak"]["rss"]
        if setup > WHOLE_MODEL_SHARE * model_bytes:
            out.append(f"{n}: set-up peaked at +{setup / MB:.0f} MB RSS, {100 * setup / model_bytes:.0f} % of the "
                       f"{model_bytes / MB:.0f} MB model: it holds the whole model in memory before offloading")
        if r["streamed_bytes_per_pass"] > EXTRA_STREAMED * model_bytes:
            extra = r["streamed_bytes_per_pass"] - model_bytes
            out.append(f"{n}: reads {r['streamed_bytes_per_pass'] / MB:.0f} MB per pass for a {model_bytes / MB:.0f} MB "
                       f"model: {extra / MB:.0f} MB is stored and read more than once (a tensor shared by two groups, "
                       "such as a tied embedding)")
        p = r["passes_peak"]
        if "blockrt" not in r and p["file"] > p["anon"]:
            out.append(f"{n}: its weights are file-backed pages during the passes (peak +{p['file'] / MB:.0f} MB "
                       f"file-backed vs +{p['anon'] / MB:.0f} MB anonymous): mmap'd, droppable by the OS")
        folder = (r.get("notes") or {}).get("offload_folder_bytes")
        if folder == 0 and r["streamed_bytes_per_pass"] > 0:
            out.append(f"{n}: wrote nothing to its offload folder; its disk-placed weights are read from the "
                       "original safetensors checkpoint")
    res_r = res.get("resident", {})
    if "passes_peak" in res_r and res_r["passes_peak"]["file"] > res_r["passes_peak"]["anon"]:
        out.append(f"resident: +{res_r['passes_peak']['file'] / MB:.0f} MB of its weights are file-backed (the "
                   "loader mmaps the safetensors checkpoint)")
    return out


def load_changed(res: dict[str, dict[str, Any]]) -> str | None:
    """A warning when a streamed contender beat the resident model: it computes the same maths plus loads, so
    the machine's load (other processes) must have changed between the runs and the ratios are not usable."""
    fast = [n for n, r in res.items() if n != "resident" and r.get("vs_resident", 1.0) < NOISE_FLOOR]
    if not fast:
        return None
    return (f"warning: {', '.join(fast)} ran faster than the resident model (< {NOISE_FLOOR}x), which does the same "
            "maths with every weight in memory: usually the machine's load changed between the runs; re-run on a quiet "
            "machine")


def table(model: str, regime: str, res: dict[str, dict[str, Any]]) -> str:
    """The per-(model, regime) table printed by peers.py."""
    head = (f"{'contender':<31} {'setup':>6} {'wall/pass':>9} {'x res':>6} {'brt x':>6} {'roofline':>8} "
            f"{'load-only':>9} {'streamed':>9} {'RSS pass':>8} {'anon':>6} {'file':>6} {'RSS+setup':>9}  parity")
    units = (f"{'':<31} {'s':>6} {'s':>9} {'':>6} {'':>6} {'':>8} {'s/pass':>9} {'MB/pass':>9} {'MB':>8} {'MB':>6} "
             f"{'MB':>6} {'MB':>9}")
    lines = [f"-- {model}, {regime} (RSS = peak minus the import baseline; brt x = this wall / blockrt's wall)", head, units]
    for name, r in res.items():
        if "wall_per_pass" not in r:
            lines.append(f"{name:<31} {_status(r)}")
            continue
        p = r["passes_peak"]
        lines.append(
            f"{name:<31} {r['setup_s']:6.1f} {r['wall_per_pass']:9.3f} {r['vs_resident']:6.2f} "
            f"{_f(r.get('blockrt_speedup'), '6.2f')} {r['roofline_ratio']:8.2f} {r['load_only_s']:9.3f} "
            f"{r['streamed_bytes_per_pass'] / MB:9.0f} {p['rss'] / MB:8.0f} {p['anon'] / MB:6.0f} {p['file'] / MB:6.0f} "
            f"{_peak_with_setup(r) / MB:9.0f}  {_parity(r)}")
        if "blockrt" in r:
            b = r["blockrt"]
            bw = b["bytes_loaded_per_pass"] / b["load_s"] / 1e9 if b["load_s"] > 0 else 0.0
            lines.append(f"{'':<31} blockrt: load {b['load_s']:.3f} s ({bw:.2f} GB/s), compute {b['compute_s']:.3f} s, stall "
                         f"{b['stall_s']:.3f} s per pass; {b['bytes_loaded_per_pass'] / MB:.0f} MB loaded, "
                         f"{b['bytes_reused_per_pass'] / MB:.0f} MB reused per pass, {b['retained_blocks']} blocks "
                         f"retained; peak ledger {b['peak_ledger_bytes'] / MB:.0f} of {b['budget'] / MB:.0f} MB")
    warning = load_changed(res)
    return "\n".join(lines + not_cold(res) + ([warning] if warning else []))


def table_findings(model_bytes: int, res: dict[str, dict[str, Any]]) -> str:
    return "\n".join(f"finding: {f}" for f in findings(model_bytes, res))


def import_costs(results: dict[str, Any]) -> dict[str, float]:
    """Median RSS after each import stage over every process, as increments (bytes)."""
    stages: dict[str, list[int]] = {}
    for m in results["models"].values():
        for res in m["regimes"].values():
            for r in res.values():
                for k, v in (r.get("imports") or {}).items():
                    stages.setdefault(k, []).append(v)
    med = {k: statistics.median(v) for k, v in stages.items()}
    out, prev = {}, 0.0
    for k, v in med.items():
        out[k] = v - prev
        prev = v
    if med:
        out["total"] = prev
    return out


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets on the T5 work, measured (PASS/MISS; never asserted)."""
    t5 = results["models"].get("t5")
    out: list[dict[str, Any]] = []
    if not t5:
        return out

    def add(name: str, value: float | None, limit: float, text: str) -> None:
        verdict = "n/a" if value is None else ("PASS" if value <= limit else "MISS")
        out.append({"name": name, "value": value, "target": limit, "value_text": text, "verdict": verdict})

    for regime, res in t5["regimes"].items():
        b = res.get("blockrt", {})
        noisy = " (machine load changed: unreliable)" if load_changed(res) else ""
        if "wall_per_pass" not in b:
            add(f"t5 {regime}: blockrt ran", None, 0, _status(b) if b else "not run")
            continue
        if regime == "warm":
            add("t5 warm: blockrt wall <= 1.05x resident", b["vs_resident"], TARGET_WARM_VS_RESIDENT,
                f"{b['vs_resident']:.3f}x{noisy}")
        else:
            add("t5 throttled: blockrt wall <= 1.05x max(load, compute)", b["roofline_ratio"],
                TARGET_THROTTLED_ROOFLINE, f"roofline {b['roofline_ratio']:.3f}")
        peak = _peak_with_setup(b)
        add(f"t5 {regime}: blockrt peak RSS <= imports + 250 MB", peak, TARGET_RSS_OVER_IMPORTS, f"+{peak / MB:.0f} MB")
        ran = [r for n, r in res.items() if n in PEERS and n != "blockrt_sequential" and "blockrt_speedup" in r]
        if ran:
            worst = min(r["blockrt_speedup"] for r in ran)
            out.append({"name": f"t5 {regime}: blockrt faster than every peer", "value": worst, "target": 1.0,
                        "value_text": f"min speedup {worst:.2f}x{noisy}", "verdict": "PASS" if worst > 1.0 else "MISS"})
    return out


def markdown(results: dict[str, Any]) -> str:
    """``peers.md``: the tables the results page includes."""
    hw = results["hardware"]
    cfg = results["config"]
    imp = import_costs(results)
    lines = ["# blockrt against its peers", "",
             f"Measured on {hw['cpu']} ({hw['cores']} cores, torch {hw['torch']}, {cfg['threads']} torch threads per "
             f"contender, GPU: {hw.get('gpu') or 'none'}), one run, each contender in a fresh process; other processes "
             f"used {hw.get('other_cpu_cores_during', 0):.2f} cores on average (load average {hw['loadavg_before'][0]:.2f} "
             f"before, {hw.get('loadavg_after', [0])[0]:.2f} after). {cfg['passes']} timed passes after 1 warm-up "
             f"(medians).", ""]
    if imp:
        parts = ", ".join(f"{k} +{v / MB:.0f} MB" for k, v in imp.items() if k != "total")
        lines += [f"Import baseline (RSS after importing every library, the same in every process): "
                  f"{imp['total'] / MB:.0f} MB ({parts}). Memory columns are peaks minus that baseline.", ""]
    alone = results.get("import_costs_alone")
    if alone:
        lines += ["Each library imported alone in a fresh process (after torch; torch after a bare interpreter): "
                  + ", ".join(f"{k} +{v / MB:.0f} MB" for k, v in alone.items()) + ".", ""]
    lines += ["Regimes: **warm** = page cache warm, no throttle; **cold** = blockrt's loads throttled to "
              f"{cfg['read_bps'] / 1e9:.2f} GB/s and every contender's files dropped from the page cache before "
              "every pass (the peers cannot be throttled: for them cold reads are the slow-read stand-in).", ""]
    for model, m in results["models"].items():
        for regime, res in m["regimes"].items():
            lines += [f"## {m['workload']['title']}, {regime}, budget {m['budget'] / MB:.0f} MB", "",
                      "| contender | wall/pass s | × resident | blockrt speedup | roofline | peak RSS MB (anon / file) | "
                      "peak RSS incl. set-up MB | set-up s | parity |", "|---|---|---|---|---|---|---|---|---|"]
            for name, r in res.items():
                if "wall_per_pass" not in r:
                    lines.append(f"| {name} | {_status(r)} | | | | | | | |")
                    continue
                p = r["passes_peak"]
                lines.append(f"| {name} | {r['wall_per_pass']:.3f} | {r['vs_resident']:.2f} | "
                             f"{_f(r.get('blockrt_speedup'), '.2f')} | {r['roofline_ratio']:.2f} | {p['rss'] / MB:.0f} "
                             f"({p['anon'] / MB:.0f} / {p['file'] / MB:.0f}) | {_peak_with_setup(r) / MB:.0f} | "
                             f"{r['setup_s']:.1f} | {_parity(r)} |")
            warning = load_changed(res)
            found = findings(m["workload"]["bytes"], res)
            lines += [""] + [f"- {f}" for f in found] + [f"- {n}" for n in not_cold(res)] + ([f"- **{warning}**"] if warning else []) + [""]
    if results.get("targets"):
        lines += ["Targets (issue 7, T5 work):", ""]
        lines += [f"- {t['name']}: {t['value_text']} **{t['verdict']}**" for t in results["targets"]]
        lines.append("")
    return "\n".join(lines)
