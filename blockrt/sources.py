"""Weight sources: where each tensor of a plan lives on disk.

A source maps every key of a Plan to a ``Segment`` (file, absolute offset, length). Two kinds exist:
the blockrt store (``store.py``: one file per block, with checksums) and an existing checkpoint, read in
place: one ``.safetensors`` file, or a sharded one with its ``*.safetensors.index.json``. A tensor may be
stored narrower than it is computed (float16/bfloat16, or int8 with scales in a store); the loader widens it.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

import torch

from .errors import StoreError
from .guards import inside, open_regular, read_json
from .partitioners.plan import FLOAT_DTYPES, Plan, dtype_from_name
from .safetensors_format import Segment, read_header


class WeightSource:
    """Base: a resolved map from plan keys to segments, plus optional per-block checksums."""

    description = "weights"

    def __init__(self, segments: dict[str, Segment]) -> None:
        self.segments = segments

    def segment(self, key: str) -> Segment:
        return self.segments[key]

    def block_crc32(self, block_index: int) -> int | None:
        """The expected crc32 of a block's data in file order, when the source records one."""
        return None

    def files(self) -> list[str]:
        return sorted({s.path for s in self.segments.values()})

    def read_tensor(self, key: str, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor into fresh memory (the small pinned part at start-up; conversions block by block).

        Returned in its stored dtype, or in ``dtype`` if given (an int8 tensor stored with ``key.scale`` is
        dequantised, see ``quantize.py``)."""
        seg = self.segments[key]
        if dtype is not None and seg.dtype.startswith("int4pack"):
            raise StoreError(f"{key!r} is stored as {seg.dtype}, in the nibble order of PyTorch's int4 kernel, which "
                             "only a runtime with RunConfig(packed_compute=True) computes with; fix: read it from the "
                             "checkpoint, or from a store written without packed_compute")
        if seg.dtype.startswith("int4"):  # packed: the bytes as uint8 (out, K/2)
            out = torch.empty(seg.shape[0], seg.nbytes // max(1, seg.shape[0]), dtype=torch.uint8)
        else:
            out = torch.empty(seg.shape, dtype=dtype_from_name(seg.dtype))
        if seg.nbytes:
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            with open_regular(seg.path) as f:
                read_exactly(f.fileno(), [view], seg.offset, seg.path)
        if dtype is not None and out.dtype != dtype:
            from .quantize import from_storage, scale_key

            quantised = out.dtype in (torch.int8, torch.uint8) and scale_key(key) in self.segments
            scale = self.read_tensor(scale_key(key)) if quantised else None
            out = from_storage(out, scale, dtype, seg.shape)
        return out.to(device)


def read_exactly(fd: int, views: list[memoryview], offset: int, path: str) -> int:
    """``preadv`` the file range starting at ``offset`` into ``views`` (scatter), retrying short reads."""
    total = sum(v.nbytes for v in views)
    done = 0
    pending = list(views)
    while pending:
        n = os.preadv(fd, pending[:1024], offset + done)  # IOV_MAX is 1024 on Linux
        if n == 0:
            raise StoreError(f"{path}: unexpected end of file at byte {offset + done} (wanted {total - done} more); the file is truncated")
        done += n
        while pending and n >= pending[0].nbytes:
            n -= pending[0].nbytes
            pending.pop(0)
        if n:
            pending[0] = pending[0][n:]
    return total


class CheckpointSource(WeightSource):
    """Tensors read in place from an existing safetensors checkpoint (single file or sharded).

    Args:
        path: a ``.safetensors`` file, a ``*.safetensors.index.json``, or a directory holding
            ``model.safetensors.index.json`` or ``model.safetensors`` (or exactly one of either kind).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.description = f"checkpoint {self.path}"
        files = self._shard_files()
        segments: dict[str, Segment] = {}
        for f in files:
            segs, _ = read_header(f)
            twice = sorted(set(segs) & set(segments))
            if twice:
                raise StoreError(f"{self.description}: tensor {twice[0]!r} is stored in both {segments[twice[0]].path} "
                                 f"and {f} ({len(twice)} such); expected each tensor in one shard; fix: use the "
                                 "checkpoint's own shards and index")
            segments.update(segs)
        super().__init__(segments)

    def _shard_files(self) -> list[Path]:
        p = self.path
        if p.is_dir():
            index = p / "model.safetensors.index.json"
            single = p / "model.safetensors"
            if index.exists():
                p = index
            elif single.exists():
                p = single
            else:
                indexes = sorted(p.glob("*.safetensors.index.json"))
                files = sorted(p.glob("*.safetensors"))
                if len(indexes) == 1:
                    p = indexes[0]
                elif not indexes and len(files) == 1:
                    p = files[0]
                else:
                    raise StoreError(
                        f"{self.path}: expected model.safetensors, model.safetensors.index.json, or exactly one "
                        f"*.safetensors(.index.json) file; found {[f.name for f in indexes + files] or 'none'}"
                    )
        if not p.exists():
            raise StoreError(f"expected a checkpoint at {p}, but it does not exist")
        if p.name.endswith(".index.json"):
            return self._index_shards(p)
        return [p]

    def _index_shards(self, p: Path) -> list[Path]:
        """The shard files a ``*.index.json`` names: each a plain name inside the index's directory (or, for an
        index that is a symbolic link as in the Hugging Face cache, inside the directory it points into)."""
        fix = "fix: use the index.json written with the checkpoint"
        index = read_json(p, fix)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            found = type(index).__name__ if not isinstance(index, dict) else \
                ("no 'weight_map'" if weight_map is None else f"'weight_map' {str(weight_map)[:80]}")
            raise StoreError(f"{p}: expected a JSON object with a 'weight_map' of key -> shard file name; "
                             f"found {found}; {fix}")
        also = (p.resolve().parent,)
        shards = sorted({inside(p.parent, name, f"{p}", "fix: keep every shard inside the checkpoint's directory "
                                "(copy it there)", also) for name in weight_map.values()})
        missing = [s.name for s in shards if not s.exists()]
        if missing:
            raise StoreError(f"{p} names shard(s) {missing} that do not exist in {p.parent}; fix: copy the missing shards")
        return shards

    def resolve(self, plan: Plan, strict: bool = True, prefix: str = "", converted: Collection[str] = ()) -> None:
        """Check every plan tensor is present with its shape and dtype; keep only the plan's keys.

        A tied tensor may be stored under any of its names. ``prefix`` reads a submodule out of a whole
        model's checkpoint (plan key ``k`` is stored as ``prefix + k``; keys outside the prefix are ignored).
        With ``strict``, keys under the prefix that the plan does not know are an error too. A key in
        ``converted`` (written into a store in another dtype before anything reads it) may be stored as any float
        for a float tensor, a wider one too. All problems are reported together.
        """
        if prefix:
            self.segments = {k[len(prefix):]: v for k, v in self.segments.items() if k.startswith(prefix)}
            if not self.segments:
                raise StoreError(f"{self.description} has no key starting with {prefix!r}; "
                                 "fix: check RunConfig(weights_prefix=...) against the checkpoint's key names")
        names_of: dict[str, list[str]] = {}
        for alias, owner in plan.aliases.items():
            names_of.setdefault(owner, []).append(alias)
        resolved: dict[str, Segment] = {}
        missing, wrong = [], []
        for key, spec in plan.all_specs().items():
            found = next((self.segments[n] for n in [key, *names_of.get(key, [])] if n in self.segments), None)
            if found is None:
                missing.append(key)
            elif found.shape != spec.shape or not (_widens(found.dtype, spec.dtype) or key in converted and
                                                    found.dtype in FLOAT_DTYPES and spec.dtype in FLOAT_DTYPES):
                wrong.append(f"{key}: expected {spec.dtype}{list(spec.shape)}, found {found.dtype}{list(found.shape)}")
            else:
                resolved[key] = found
        known = set(plan.all_specs()) | set(plan.aliases)
        unexpected = sorted(set(self.segments) - known) if strict else []
        if missing or wrong or unexpected:
            parts = [f"{self.description} does not match the model ({plan.model_class}):"]
            for title, items in (("missing keys", missing), ("wrong shape or dtype", wrong), ("unexpected keys", unexpected)):
                if items:
                    shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                    parts.append(f"  {title} ({len(items)}): " + "; ".join(shown))
            parts.append("fix: point weights= at the checkpoint of this architecture (and dtype)"
                         + (", or pass RunConfig(strict_keys=False) to ignore extra keys" if unexpected else ""))
            raise StoreError("\n".join(parts))
        self.segments = resolved


def _widens(stored: str, compute: str) -> bool:
    """A checkpoint tensor stored as ``stored`` can feed a ``compute`` one: the same dtype, or a float that the
    loader widens exactly (a bfloat16 checkpoint streams into a float32 model)."""
    return stored == compute or (stored in FLOAT_DTYPES and compute in FLOAT_DTYPES
                                 and dtype_from_name(stored).itemsize <= dtype_from_name(compute).itemsize)
