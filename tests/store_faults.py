"""Helpers of the integrity tests: the toy model spilled to a store or saved as a checkpoint, streamed back,
and the faults done to it: a flipped byte, an edited header or manifest, a reader stuck on a FIFO."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file

import blockrt
from blockrt import RunConfig
from blockrt.partitioners import partition
from models import build_toy

BUDGET = "64MB"
HANG_S = 10.0  # a refusal must come within this long; a hang would not


def output(model, inputs, rt=None) -> torch.Tensor:
    with torch.no_grad():
        return (rt or model)(**inputs).clone()


def spill(path: Path, seed: int = 0) -> Path:
    """The toy model written as a store at ``path``."""
    model, _ = build_toy(seed)
    blockrt.run(model, budget=BUDGET, store=path).close()
    return path


def stream(weights: Path, config: RunConfig | None = None) -> torch.Tensor:
    """The toy's output, its weights streamed from ``weights`` onto a meta skeleton."""
    with blockrt.meta_weights():
        skeleton, inputs = build_toy(0)
    with blockrt.run(skeleton, budget=BUDGET, weights=weights, config=config) as rt:
        return output(skeleton, inputs, rt)


def header_of(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def rewrite_header(path: Path, edit) -> None:
    """Apply ``edit(header)`` to a safetensors header in place, keeping its length (spaces pad it)."""
    n, header = header_of(path)
    edit(header)
    blob = json.dumps(header, separators=(",", ":")).encode()
    assert len(blob) <= n
    data = path.read_bytes()
    path.write_bytes(data[:8] + blob + b" " * (n - len(blob)) + data[8 + n:])


def flip_byte(path: Path, at: int) -> None:
    n, _ = header_of(path)
    data = bytearray(path.read_bytes())
    data[8 + n + at] ^= 0x80  # a float32's sign bit when ``at`` is 3 mod 4
    path.write_bytes(bytes(data))


class Replace:
    """An edit that replaces the whole manifest."""

    def __init__(self, value) -> None:
        self.value = value


def edit_manifest(store: Path, edit) -> None:
    """Apply ``edit(manifest)`` (in place; its result is ignored unless a ``Replace``) to a store's manifest."""
    path = store / "manifest.json"
    m = json.loads(path.read_text())
    new = edit(m)
    path.write_text(json.dumps(new.value if isinstance(new, Replace) else m))


def checkpoint(directory: Path, seed: int = 0, name: str = "model.safetensors") -> Path:
    model, _ = build_toy(seed)
    directory.mkdir(parents=True, exist_ok=True)
    owned = partition(model).all_specs()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k in owned}, directory / name)
    return directory / name


def refused_in_time(fifo: Path, run) -> BaseException:
    """Run ``run`` in a thread; it must raise within HANG_S. A reader stuck on ``fifo`` is released after."""
    box: list[BaseException] = []

    def target():
        try:
            run()
        except BaseException as e:  # noqa: BLE001 - carried to the test
            box.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(HANG_S)
    hung = t.is_alive()
    if hung:  # unblock the stuck open() so the thread can end
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(HANG_S)
    assert not hung, f"blocked on the FIFO {fifo} for {HANG_S} s"
    assert box, "expected an error"
    return box[0]
