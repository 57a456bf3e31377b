"""One contender of the token-by-token generation benchmark in a fresh process (``benchmarks/decode.py``).

``python benchmarks/decode_worker.py JOB.json RESULT.json``: sets up one contender at one budget and regime,
then for each batch size generates greedily (one untimed warm-up generate, then the timed ones; in the cold
regime the contender's files are dropped from the page cache before each timed generate), measuring per batch:
wall, bytes its hooks read per step, peak RSS above the baseline (anonymous and file-backed), and the tokens
(and the first row's logits, to compare with the resident model's). Contenders (``CONTENDERS``):

    resident                  ``LlamaForCausalLM.from_pretrained`` whole in memory (the reference)
    accelerate_disk_offload   accelerate ``disk_offload(model, folder)``: every weight to .dat files (no budget)
    accelerate_device_map     ``from_pretrained(device_map="auto", max_memory={device: budget}, offload_folder)``
    accelerate_cpu_offload    accelerate ``cpu_offload(model, execution_device)``: weights in host memory, each
                              module's copied to the device as it runs (no budget; meant for CUDA)
    diffusers_group_offload   ``apply_group_offloading`` on the decoder (``model.model``: one group per decoder
                              layer, the embedding and final norm one more; on CPU ``offload_to_disk_path``, on CUDA
                              ``use_stream=True`` from host memory); the LM head stays resident (no budget)
    airllm                    ``airllm.AutoModel.from_pretrained(dir, device="cpu")`` (layer files on disk)
    blockrt_sequential        blockrt, prefetch 0, retention off (the paper's sequential baseline)
    blockrt                   blockrt, prefetch 1, retention under the budget
    blockrt_mapped            the same, streamed blocks bound to their files' pages instead of copied
                              (``RunConfig(mapped=True)``; the checkpoint converted once into an aligned store)
    blockrt_int8, blockrt_int4   the same, blocks stored int8 / int4 (groups of 128), converted once
    blockrt_int8_packed, blockrt_int4_packed   the same stores (int4 in the kernel's nibble order), the Linears
                              computed packed by PyTorch's weight-only kernels (``RunConfig(packed_compute=True)``)
                              on bfloat16 activations (``PACKED_DTYPE``: the kernels' float32 path is scalar,
                              ``benchmarks/packed_matmul.py``), never widened

A failure is a result (``error``), not a crash.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from peers_worker import Contender, _files_under, _on_disk, _unique_param_bytes, read_files

CONTENDERS = ("resident", "accelerate_disk_offload", "accelerate_device_map", "accelerate_cpu_offload",
              "diffusers_group_offload", "airllm", "blockrt_sequential", "blockrt", "blockrt_mapped", "blockrt_int8",
              "blockrt_int4", "blockrt_int8_packed", "blockrt_int4_packed")
DEFAULT_CONTENDERS = tuple(c for c in CONTENDERS if c != "accelerate_cpu_offload")  # on CPU it is the resident model
# run once per regime (no budget to give them)
NO_BUDGET = ("resident", "accelerate_disk_offload", "accelerate_cpu_offload", "diffusers_group_offload", "airllm")
STORAGE = {"blockrt_int8": "int8", "blockrt_int4": "int4", "blockrt_int8_packed": "int8", "blockrt_int4_packed": "int4"}
PACKED = {"blockrt_int8_packed": "blockrt_int8", "blockrt_int4_packed": "blockrt_int4"}  # -> its widened contender
PACKED_DTYPE = "bfloat16"
SEED = 0


def prompt(vocab: int, batch: int, tokens: int) -> "torch.Tensor":  # noqa: F821
    """The prompts: ``batch`` rows of ``tokens`` random ids (the first row the same at every batch size)."""
    import torch

    g = torch.Generator().manual_seed(SEED + 1)
    rows = torch.randint(1, vocab, (max(batch, 1), tokens), generator=g)  # (batch, tokens)
    return rows[:batch]


def generate(model: Any, ids: "torch.Tensor", new: int, device: str = "cpu") -> tuple[Any, Any]:  # noqa: F821
    """Greedy ``new`` tokens: (sequences (batch, prompt + new), the first row's logits (new, vocab))."""
    import torch

    ids = ids.to(device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    return out.sequences.cpu(), torch.stack([x[0].float().cpu() for x in out.logits])


def setup(job: dict[str, Any]) -> Contender:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    name, ckpt, budget, device = job["contender"], job["dir"], job["budget"], job["device"]
    dtype = getattr(torch, job.get("dtype", "float32"))
    offload = Path(job["offload_dir"])
    if name == "resident":
        return Contender(LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype).eval().to(device), device=device)
    if name in ("accelerate_disk_offload", "accelerate_cpu_offload"):
        from accelerate import cpu_offload, disk_offload
        model = LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
        streamed = _unique_param_bytes(model)
        if name == "accelerate_cpu_offload":
            cpu_offload(model, execution_device=torch.device(device))
            return Contender(model, [], streamed, device=device)
        disk_offload(model, offload, execution_device=torch.device(device))
        return Contender(model, _files_under(offload), streamed, device=device)
    if name == "accelerate_device_map":
        gpu = 0 if device.startswith("cuda") else "cpu"
        host = {"cpu": 1 << 50} if gpu == 0 else {}
        model = LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype, device_map="auto",
                                                 max_memory={gpu: budget, **host, "disk": 1 << 50},
                                                 offload_folder=str(offload)).eval()
        dm = dict(getattr(model, "hf_device_map", None) or {"": "cpu"})
        written = _files_under(offload)
        files = written if any(p.suffix == ".dat" for p in written) else sorted(Path(ckpt).glob("*.safetensors"))
        return Contender(model, files, _unique_param_bytes(model, _on_disk(dm)), device=device,
                         notes={"on_disk": sorted(k for k, v in dm.items() if str(v) == "disk")[:40]})
    if name == "diffusers_group_offload":
        from diffusers.hooks import apply_group_offloading
        model = LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
        model.lm_head.to(device)
        cuda = device.startswith("cuda")  # CUDA: CUDA streams from pinned host memory; CPU: from disk files
        streamed = _unique_param_bytes(model.model)
        apply_group_offloading(model.model, onload_device=torch.device(device), offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1, use_stream=cuda,
                               offload_to_disk_path=None if cuda else str(offload))
        files = _files_under(offload)
        return Contender(model, files, sum(p.stat().st_size for p in files) if files else streamed, device=device,
                         notes={"groups": len(files), "use_stream": cuda})
    if name == "airllm":
        from airllm import AutoModel  # from the scratch folder decode.py puts on PYTHONPATH (--airllm-path)
        model = AutoModel.from_pretrained(ckpt, device="cuda:0" if device.startswith("cuda") else "cpu", dtype=dtype,
                                          layer_shards_saving_path=str(offload), prefetching=False)
        files = _files_under(offload)
        return Contender(model, files, sum(p.stat().st_size for p in files), device=device)
    if name.startswith("blockrt"):
        import blockrt
        from blockrt import RunConfig
        with blockrt.meta_weights():
            skeleton = LlamaForCausalLM(LlamaConfig.from_pretrained(ckpt)).eval()
        seq = name == "blockrt_sequential"
        packed = name in PACKED
        store = STORAGE[name] + ("-packed" if packed else "") if name in STORAGE else None  # int4: another layout
        store = "aligned" if name == "blockrt_mapped" else store
        cfg = RunConfig(prefetch_depth=0 if seq else 1, retention=not seq, storage_dtype=STORAGE.get(name),
                        store_path=str(Path(job["store_root"]) / store) if store else None,
                        rss_interval_s=None, device=job["device"], packed_compute=packed,
                        packed_dtype=PACKED_DTYPE if packed else None, mapped=name == "blockrt_mapped")
        rt = blockrt.run(skeleton, budget=budget, weights=ckpt, config=cfg)
        stored = sum(rt._source.segment(k).nbytes for b in rt.plan.blocks for k in b.keys)
        return Contender(skeleton, [Path(f) for f in rt.weight_files], stored, device=job["device"], runtime=rt,
                         notes={"blocks": len(rt.plan.blocks), "pinned_bytes": rt.plan.pinned_bytes,
                                "block_bytes": rt.plan.block_bytes, "stored_block_bytes": stored})
    raise ValueError(f"unknown contender {name!r}; expected one of {CONTENDERS}")


def _blockrt_step_bytes(rt: Any, before: int) -> int:
    """Bytes the loader read since the profile held ``before`` events."""
    return sum(e.nbytes for e in rt.profile.events[before:] if e.kind == "load")


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Set up one contender, generate at each batch size, measure; outputs saved next to the result."""
    import torch
    from safetensors.torch import save_file

    from blockrt.malloc import trim_malloc
    from blockrt.memory import RssSampler, read_rss
    from blockrt.page_cache import drop_page_cache

    torch.set_num_threads(job["threads"])
    cold = job["regime"] == "cold"
    offload = Path(job["offload_dir"])
    shutil.rmtree(offload, ignore_errors=True)
    offload.mkdir(parents=True)
    result: dict[str, Any] = {"contender": job["contender"], "regime": job["regime"], "budget": job["budget"],
                              "budget_share": job["budget_share"], "error": None, "batches": {}}
    gc.collect()
    trim_malloc()
    base = read_rss()
    handle = None
    try:
        t0 = time.perf_counter()
        handle = setup(job)
        result["setup_s"] = time.perf_counter() - t0
        result["notes"] = handle.notes
        result["streamed_bytes_per_step"] = handle.streamed_bytes
        rt = handle.runtime
        for k, batch in enumerate(job["batches"]):
            ids = prompt(job["vocab"], batch, job["prompt_tokens"])
            row: dict[str, Any] = {"batch": batch}
            try:
                if rt is not None and k:  # a fresh runtime per batch: its retention is planned for this batch's
                    rt.close()            # working set (one runtime kept across batches refuses the larger ones)
                    handle = setup(job)
                    rt = handle.runtime
                generate(handle.call, ids, job["new_tokens"], handle.device)  # warm-up: caches, working set
                walls, reads = [], []
                cuda = handle.device.startswith("cuda")
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                sampler = RssSampler().start()
                try:
                    for _ in range(job["reps"]):
                        if cold and handle.files:
                            drop_page_cache(handle.files)
                        n0 = len(rt.profile.events) if rt is not None else 0
                        t1 = time.perf_counter()
                        seqs, logits = generate(handle.call, ids, job["new_tokens"], handle.device)
                        walls.append(time.perf_counter() - t1)
                        if rt is not None:
                            reads.append(_blockrt_step_bytes(rt, n0))
                finally:
                    sampler.stop()
                row.update(wall_s=min(walls), walls=walls,
                           peak_rss=max(sampler.peak_rss, sampler.hwm or 0) - base.rss,
                           peak_anon=sampler.peak_anon - base.anon, peak_file=sampler.peak_file - base.file,
                           peak_gpu=torch.cuda.max_memory_allocated() if cuda else None)
                steps = job["new_tokens"]  # forwards per generate: the prefill and new - 1 decode steps
                row["bytes_per_step"] = (min(reads) / steps if reads else handle.streamed_bytes)
                if rt is not None:
                    row["peak_ledger"] = rt.ledger.peak
                    row["retained_blocks"] = len(rt.retention.retained) if rt.retention else 0
                out_path = Path(job["output_prefix"] + f"_b{batch}.safetensors")
                save_file({"sequences": seqs.contiguous(), "logits": logits.contiguous()}, str(out_path))
                row["output"] = str(out_path)
            except Exception as e:  # noqa: BLE001 - one batch failing is a finding
                row["error"] = f"{type(e).__name__}: {e}"
                row["traceback"] = traceback.format_exc(limit=4)
            result["batches"][str(batch)] = row
        if rt is not None:
            rt.close()
            result["budget_bytes"] = rt.budget
        nbytes, secs = read_files(handle.files, cold)  # a plain sequential read of the same files
        result["plain_read"] = {"bytes": nbytes, "seconds": secs, "bytes_per_s": nbytes / secs if secs > 0 else None}
    except Exception as e:  # noqa: BLE001 - a contender that fails is a finding, reported by decode.py
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc(limit=6)
    finally:
        if handle is not None and handle.runtime is not None:
            handle.runtime.close()
        shutil.rmtree(offload, ignore_errors=True)
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit("usage: decode_worker.py JOB.json RESULT.json (started by benchmarks/decode.py)")
    import torch  # noqa: F401  - the same imports in every process before the baseline
    import transformers  # noqa: F401
    import accelerate  # noqa: F401
    import blockrt  # noqa: F401
    from blockrt.files import write_atomic

    job = json.loads(Path(argv[0]).read_text())
    result = run_job(job)
    data = json.dumps(result, indent=1).encode()
    write_atomic(argv[1], lambda f: f.write(data))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
