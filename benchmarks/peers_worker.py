"""One contender of the peer comparison in a fresh process: imports, set-up, passes, memory, load-only reads.

``benchmarks/peers.py`` starts ``python benchmarks/peers_worker.py JOB.json RESULT.json`` once per contender
and regime, so peak RSS is per contender and every process imports the same libraries (torch, transformers,
accelerate, diffusers, blockrt and the Open-Sora models) before the baseline is read. Contenders:

    resident                  the plain model, whole in memory (reference output, compute-only time)
    accelerate_disk_offload   accelerate ``disk_offload(model, folder)``: every weight to .dat files
    accelerate_device_map     T5: transformers ``from_pretrained(device_map="auto", max_memory={"cpu": budget},
                              offload_folder=...)``; STDiT3: ``init_empty_weights`` + accelerate
                              ``load_checkpoint_and_dispatch`` with ``infer_auto_device_map`` under the same max_memory
    diffusers_group_offload   ``apply_group_offloading(block_level, num_blocks_per_group=1, offload_to_disk_path)``
    diffusers_group_offload_stream   the same with ``use_stream=True`` on a CUDA device (needs a GPU)
    blockrt_sequential        blockrt, ``prefetch_depth=0``, retention off: the paper's sequential loading
    blockrt                   blockrt, prefetch 1 and retention under the budget

A peer's failure is a result (``error``), not a crash: the comparison reports it.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONTENDERS = ("resident", "accelerate_disk_offload", "accelerate_device_map", "diffusers_group_offload",
              "diffusers_group_offload_stream", "blockrt_sequential", "blockrt")
READ_CHUNK = 64 << 20  # load-only reads go through one reused 64 MiB buffer


def _status_rss() -> int:
    """VmRSS in bytes without importing anything (the first reading, before torch)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def import_all() -> dict[str, int]:
    """Import every library any contender uses, recording RSS after each: the same imports in every process."""
    stages = {"python": _status_rss()}
    import torch  # noqa: F401
    stages["torch"] = _status_rss()
    from transformers import T5Config, T5EncoderModel  # noqa: F401
    stages["transformers"] = _status_rss()
    from accelerate import disk_offload, init_empty_weights, load_checkpoint_and_dispatch  # noqa: F401
    stages["accelerate"] = _status_rss()
    from diffusers.hooks import apply_group_offloading  # noqa: F401
    stages["diffusers"] = _status_rss()
    import blockrt  # noqa: F401
    import peers_workloads  # noqa: F401
    from blockrt.pipelines.opensora import loading, sampler, stdit3  # noqa: F401
    stages["blockrt+pipelines"] = _status_rss()
    return stages


@dataclass
class Contender:
    """A contender after set-up: ``call`` runs one pass; ``files`` are what its passes read from disk."""

    call: Callable[..., Any]
    files: list[Path] = field(default_factory=list)
    streamed_bytes: int = 0  # bytes its hooks read per pass
    device: str = "cpu"
    notes: dict[str, Any] = field(default_factory=dict)
    runtime: Any = None  # blockrt's Runtime


def _unique_param_bytes(model: Any, keep: Callable[[str], bool] = lambda name: True) -> int:
    seen, total = set(), 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen and keep(name):
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def _files_under(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file()) if d.is_dir() else []


def _on_disk(device_map: dict[str, Any]) -> Callable[[str], bool]:
    def keep(name: str) -> bool:
        best = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
        return best is not None and device_map[best] == "disk"
    return keep


def setup(job: dict[str, Any]) -> Contender:
    import torch

    import peers_workloads as wl

    spec, name, budget = job["workload"], job["contender"], job["budget"]
    offload = Path(job["offload_dir"])
    if name == "resident":
        return Contender(wl.build_resident(spec))
    if name == "accelerate_disk_offload":
        from accelerate import disk_offload
        model = wl.build_resident(spec)  # disk_offload takes a model in memory and writes its state dict
        streamed = _unique_param_bytes(model)
        disk_offload(model, offload)
        return Contender(model, _files_under(offload), streamed)
    if name == "accelerate_device_map":
        max_memory = {"cpu": budget, "disk": 1 << 50}
        if spec["name"] == "t5":
            from transformers import T5EncoderModel
            model = T5EncoderModel.from_pretrained(spec["dir"], device_map="auto", max_memory=max_memory,
                                                   offload_folder=str(offload)).eval()
        else:
            from accelerate import infer_auto_device_map, load_checkpoint_and_dispatch
            from blockrt.pipelines.opensora.loading import find_weights
            model = wl.build_empty(spec)
            dm = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=wl.block_classes(spec))
            model = load_checkpoint_and_dispatch(model, str(find_weights(spec["dir"])), device_map=dm,
                                                 offload_folder=str(offload)).eval()
        # transformers sets no hf_device_map when the whole map is one device (everything fit in max_memory)
        dm = dict(getattr(model, "hf_device_map", None) or {"": "cpu"})
        written = _files_under(offload)
        files = written if any(p.suffix == ".dat" for p in written) else wl.checkpoint_files(spec) + written
        return Contender(model, files, _unique_param_bytes(model, _on_disk(dm)),
                         notes={"device_map": {k: str(v) for k, v in dm.items()},
                                "offload_folder_bytes": sum(p.stat().st_size for p in written)})
    if name in ("diffusers_group_offload", "diffusers_group_offload_stream"):
        from diffusers.hooks import apply_group_offloading
        stream = name.endswith("_stream")
        model = wl.build_resident(spec)  # diffusers refuses models on meta: it needs the weights in memory first
        apply_group_offloading(model, onload_device=torch.device("cuda" if stream else "cpu"),
                               offload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1,
                               use_stream=stream, offload_to_disk_path=str(offload),
                               block_modules=wl.diffusers_block_modules(spec))
        files = _files_under(offload)
        return Contender(model, files, sum(p.stat().st_size for p in files), device="cuda" if stream else "cpu",
                         notes={"groups": len(files)})
    if name in ("blockrt", "blockrt_sequential"):
        import blockrt
        from blockrt import RunConfig
        from blockrt.pipelines.opensora.loading import load_stdit3, load_t5
        loaded = (load_t5 if spec["name"] == "t5" else load_stdit3)(spec["dir"])
        seq = name == "blockrt_sequential"
        cfg = RunConfig(prefetch_depth=0 if seq else 1, retention=not seq, read_bytes_per_s=job["read_bytes_per_s"],
                        cold_reads=job["regime"] == "cold", rss_interval_s=None)
        rt = blockrt.run(loaded.model, budget=budget, weights=loaded.weights, config=cfg)
        return Contender(rt, [Path(f) for f in rt.weight_files], rt.plan.block_bytes, runtime=rt,
                         notes={"blocks": len(rt.plan.blocks), "pinned_bytes": rt.plan.pinned_bytes,
                                "largest_block_bytes": rt.plan.largest_block().nbytes})
    raise ValueError(f"unknown contender {name!r}; expected one of {CONTENDERS}")


def read_files(files: list[Path], cold: bool) -> tuple[int, float]:
    """Read ``files`` whole, as the load-only yardstick: (bytes, seconds). Cold: dropped from the cache first."""
    from blockrt.page_cache import drop_page_cache

    if not files:
        return 0, 0.0
    if cold:
        drop_page_cache(files)
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    total, t0 = 0, time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return total, time.perf_counter() - t0


def blockrt_figures(rt: Any, passes: int) -> dict[str, Any]:
    s = rt.profile.summary(passes=range(1, passes))  # the passes after the warm-up
    return {"roofline_ratio": s.roofline_ratio, "load_s": s.load_s / s.passes, "compute_s": s.compute_s / s.passes,
            "stall_s": s.stall_s / s.passes, "bytes_loaded_per_pass": s.bytes_loaded // s.passes,
            "bytes_reused_per_pass": s.bytes_reused // s.passes, "peak_ledger_bytes": rt.ledger.peak,
            "budget": rt.budget, "working_set_bytes": rt.retention.working_set_bytes,
            "retained_blocks": len(rt.retention.retained) if rt.retention else 0,
            "read_bytes_per_s": rt.read_bytes_per_s}


def _cached_share(files: list[Path]) -> float:
    """Bytes of ``files`` in the page cache / their size (``mincore``): pages a process keeps mapped survive
    ``posix_fadvise(DONTNEED)``, so a contender that maps its weights is not really read cold."""
    from blockrt.page_cache import cached_fraction

    sizes = [os.stat(p).st_size for p in files]
    total = sum(sizes)
    return sum(cached_fraction(p) * n for p, n in zip(files, sizes)) / total if total else 0.0


def _peaks(sampler: Any, base: Any) -> dict[str, int]:
    return {"rss": max(sampler.peak_rss, sampler.hwm or 0) - base.rss, "anon": sampler.peak_anon - base.anon,
            "file": sampler.peak_file - base.file}


def run_job(job: dict[str, Any], import_stages: dict[str, int] | None = None) -> dict[str, Any]:
    """Set up one contender, run its passes, and measure; returns the result dict (output saved to a file)."""
    import torch
    from safetensors.torch import save_file

    import peers_workloads as wl
    from blockrt.malloc import trim_malloc
    from blockrt.memory import RssSampler, read_rss
    from blockrt.page_cache import drop_page_cache

    torch.set_num_threads(job["threads"])
    cold = job["regime"] == "cold"
    offload = Path(job["offload_dir"])
    shutil.rmtree(offload, ignore_errors=True)
    offload.mkdir(parents=True)
    result: dict[str, Any] = {"contender": job["contender"], "workload": job["workload"]["name"],
                              "regime": job["regime"], "imports": import_stages, "error": None}
    gc.collect()
    trim_malloc()
    base = read_rss()
    result["baseline_rss"] = base.rss
    handle = None
    try:
        s_setup = RssSampler().start()
        t0 = time.perf_counter()
        try:
            handle = setup(job)
        finally:
            s_setup.stop()
        result["setup_s"] = time.perf_counter() - t0
        result["setup_peak"] = _peaks(s_setup, base)
        result["notes"] = handle.notes
        result["streamed_bytes_per_pass"] = handle.streamed_bytes
        n = job["passes"] + 1  # one warm-up pass, then the timed ones

        cached: list[float] = []  # the share of its files still in the page cache after each drop

        def before(i: int) -> None:
            if cold and handle.files:
                drop_page_cache(handle.files)
                cached.append(_cached_share(handle.files))

        s_pass = RssSampler().start()
        try:
            out, walls, same = wl.run_passes(job["workload"], handle.call, n, before, handle.device)
        finally:
            s_pass.stop()
        result["pass_walls"] = walls
        result["cached_after_drop"] = max(cached) if cached else None
        result["passes_identical"] = same
        result["passes_peak"] = _peaks(s_pass, base)
        if handle.runtime is not None:
            handle.runtime.close()
            result["blockrt"] = blockrt_figures(handle.runtime, n)
        nbytes, secs = read_files(handle.files, cold)
        result["load_probe"] = {"bytes": nbytes, "seconds": secs, "bytes_per_s": nbytes / secs if secs > 0 else None}
        save_file({"out": out.contiguous()}, job["output"])
    except Exception as e:  # noqa: BLE001 - a peer that fails is a finding, reported by peers.py
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc(limit=6)
    finally:
        if handle is not None and handle.runtime is not None:
            handle.runtime.close()
        shutil.rmtree(offload, ignore_errors=True)
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit("usage: peers_worker.py JOB.json RESULT.json (started by benchmarks/peers.py)")
    stages = import_all()
    job = json.loads(Path(argv[0]).read_text())
    result = run_job(job, stages)
    from blockrt.files import write_atomic  # imported with blockrt by import_all, after the RSS readings

    data = json.dumps(result, indent=1).encode()
    write_atomic(argv[1], lambda f: f.write(data))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
