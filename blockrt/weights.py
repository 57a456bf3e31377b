"""Where a Runtime's block weights come from: a checkpoint read in place, a blockrt store, a store converted
once from a checkpoint (storage dtypes it does not hold), or the in-memory model spilled into a store."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .binding import Binder
from .config import RunConfig
from .conversion import converted_store
from .errors import BlockrtError
from .partitioners.plan import Plan
from .quantize import stored_dtypes
from .sources import CheckpointSource, WeightSource
from .store import needs_conversion, open_or_write, open_store, require_storage


def open_weights(model: nn.Module, plan: Plan, config: RunConfig, storage: Any, weights: str | Path | None,
                 store: str | Path | None) -> tuple[WeightSource, str | None]:
    """The source of ``plan``'s tensors, and the temporary directory it lives in (None unless the in-memory
    model was spilled without a ``store`` path; the caller removes it at close). ``storage`` is the per-block
    storage dtypes asked for."""
    verify = config.verify != "never"  # the pinned file's crc32 on opening a store (blocks': as they load)
    if weights is not None:
        if store is not None:
            raise ValueError("pass either weights= (stream from a checkpoint) or store= (spill the model), not both")
        if (Path(weights) / "manifest.json").exists():
            found = open_store(weights, plan, fingerprint=None, verify=verify)
            require_storage(found, plan, storage)
            return found, None
        source = CheckpointSource(weights)
        source.resolve(plan, strict=config.strict_keys, prefix=config.weights_prefix)
        if needs_conversion(source, plan, storage):  # once, then cached (RunConfig.store_path)
            return converted_store(source, plan, storage, config.store_path, config.weights_prefix, verify=verify), None
        return source, None
    binder = Binder(model)
    tensors = {k: binder.tensor(k) for k in plan.all_specs()}
    on_meta = [k for k, t in tensors.items() if t.is_meta]
    if on_meta:
        raise BlockrtError(
            f"{type(model).__name__} has weights on the meta device ({on_meta[:3]}...) and no weights= was "
            "given (a model streamed by a closed Runtime keeps meta placeholders); fix: pass weights=<checkpoint "
            "or blockrt store directory> to stream them")
    store = store if store is not None else config.store_path
    tmpdir = None
    if store is None:
        tmpdir = tempfile.mkdtemp(prefix="blockrt-")
        store = Path(tmpdir) / "store"
    try:
        stored = stored_dtypes(plan, storage)
        return open_or_write(store, plan, tensors, stored, storage, verify=verify), tmpdir
    except BaseException:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise
