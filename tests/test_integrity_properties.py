"""Property-based (hypothesis): whatever is done to a store's manifest, to a file's safetensors header or to any
byte of any file, streaming the store gives either a ``BlockrtError`` or an output bit-identical to the plain
model's (``torch.equal``) — never a wrong output, a hang or a raw exception."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from blockrt import BlockrtError
from models import build_toy
from store_faults import output, spill, stream

pytestmark = pytest.mark.timeout(120)

# per property: each example streams the toy once (~0.2 s); derandomised, so CI is repeatable. A long search:
# BLOCKRT_HYPOTHESIS_EXAMPLES=500 (random examples then).
EXAMPLES = int(os.environ.get("BLOCKRT_HYPOTHESIS_EXAMPLES", "12"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize="BLOCKRT_HYPOTHESIS_EXAMPLES" not in os.environ,
                    database=None,
                    suppress_health_check=[HealthCheck.too_slow])
FILES = ["pinned.safetensors"] + [f"blocks/{i:04d}.safetensors" for i in range(8)]
CODES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8", "x"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    store = spill(tmp_path_factory.mktemp("pristine") / "s")
    model, inputs = build_toy(0)
    ref = output(model, inputs)
    assert torch.equal(stream(store), ref)
    return store, ref


def outcome(store: Path, ref: torch.Tensor) -> str:
    """'refused' (a BlockrtError) or 'exact'; any other exception, or a different output, fails the test."""
    try:
        out = stream(store)
    except BlockrtError:
        return "refused"
    assert torch.equal(out, ref), "a mutated store gave a wrong output"
    return "exact"


def mutated(pristine: tuple[Path, torch.Tensor], mutate) -> str:
    store, ref = pristine
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / "s"
        shutil.copytree(store, copy)
        mutate(copy)
        result = outcome(copy, ref)
    event(result)  # --hypothesis-show-statistics shows how many were refused
    return result


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**33) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=5)


@st.composite
def manifest_edits(draw) -> list[Any]:
    """A path into the manifest (biased towards 'files') and what to do at its end."""
    top = draw(st.sampled_from(["files"] * 6 + ["fingerprint", "format_version", "plan", "origin", "dtypes"]))
    return [top, draw(st.lists(st.integers(0, 2**16), max_size=4)),
            draw(st.sampled_from(["replace", "delete", "nudge"])), draw(JSON_VALUES)]


def apply_edit(m: dict, edit: list[Any]) -> None:
    top, steps, op, value = edit
    parent, key = m, top
    for s in steps:  # walk down while there is something to walk into
        node = parent[key] if key in parent or isinstance(parent, list) else None
        if isinstance(node, dict) and node:
            parent, key = node, sorted(node)[s % len(node)]
        elif isinstance(node, list) and node:
            parent, key = node, s % len(node)
        else:
            break
    if op == "delete" and (isinstance(parent, dict) and key in parent or isinstance(parent, list)):
        del parent[key]
    elif op == "nudge" and type(parent.get(key) if isinstance(parent, dict) else parent[key]) is int:
        parent[key] += 1
    else:
        parent[key] = value


@SETTINGS
@given(edit=manifest_edits())
def test_any_manifest_edit_is_refused_or_harmless(pristine, edit):
    def mutate(store: Path) -> None:
        path = store / "manifest.json"
        m = json.loads(path.read_text())
        apply_edit(m, edit)
        path.write_text(json.dumps(m))

    mutated(pristine, mutate)


def read_header(path: Path) -> tuple[int, dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def write_header(path: Path, n: int, header: dict, rest: bytes) -> None:
    blob = json.dumps(header, separators=(",", ":")).encode()
    if len(blob) <= n:
        blob += b" " * (n - len(blob))  # the same length: the data stays where it was
    else:
        blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + rest)


@SETTINGS
@given(file=st.sampled_from(FILES), op=st.sampled_from(["swap", "shift", "dtype", "shape", "rename", "drop", "add",
                                                         "metadata", "reorder"]),
       i=st.integers(0, 99), j=st.integers(0, 99), delta=st.integers(-300, 300), code=st.sampled_from(CODES))
def test_any_header_edit_is_refused_or_harmless(pristine, file, op, i, j, delta, code):
    def mutate(store: Path) -> None:
        path = store / file
        n, header, rest = read_header(path)
        keys = sorted(k for k in header if k != "__metadata__")
        a, b = keys[i % len(keys)], keys[j % len(keys)]
        if op == "swap":
            header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
        elif op == "shift":
            header[a]["data_offsets"] = [x + delta for x in header[a]["data_offsets"]]
        elif op == "dtype":
            header[a]["dtype"] = code
        elif op == "shape":
            shape = header[a]["shape"] or [1]
            header[a]["shape"] = shape[::-1] if delta % 2 else [shape[0] + delta % 3 - 1, *shape[1:]]
        elif op == "rename":
            header[a + "x"] = header.pop(a)
        elif op == "drop":
            del header[a]
        elif op == "add":
            header[f"extra.{delta}"] = dict(header[b])
        elif op == "metadata":
            header["__metadata__"] = {"note": str(delta)}
        else:
            header = dict(reversed(list(header.items())))
        write_header(path, n, header, rest)

    mutated(pristine, mutate)


@SETTINGS
@given(file=st.sampled_from(FILES + ["manifest.json"]), at=st.floats(0, 1, exclude_max=True), bits=st.integers(1, 255))
def test_any_flipped_byte_is_refused_or_harmless(pristine, file, at, bits):
    def mutate(store: Path) -> None:
        path = store / file
        data = bytearray(path.read_bytes())
        data[int(at * len(data))] ^= bits
        path.write_bytes(bytes(data))

    mutated(pristine, mutate)
