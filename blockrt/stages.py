"""Stages of a multi-model pipeline: one module streamed under the shared budget while it is the one being called.

A ``Stage`` is a module a pipeline calls through ``__call__`` (a text encoder, a transformer or UNet, a VAE's
decoder). At set-up its weights spill once into a block store (``store.py``) and every tensor the plan covers
becomes a ``meta`` placeholder: the model holds nothing. ``activate`` opens a ``Runtime`` streaming it from that
store (``weights=``); ``deactivate`` closes it and drops the pinned part too, so an idle stage holds no memory.
``restore`` gives the module its original weights back (``restore.py``), read from the store.

Which modules are stages (``stage_roots``): a component called as a whole is one; an autoencoder is called
through ``vae.decode()``/``vae.encode()``, methods no hook sees, which call its ``decoder``/``encoder``: those two
are the stages, and the little rest (``quant_conv``, ``post_quant_conv``, latent statistics) stays resident.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from .binding import Binder
from .config import RunConfig
from .packed_compute import packed_keys
from .partitioners import partition
from .partitioners.plan import Plan
from .quantize import stored_dtypes
from .restore import Originals, keep_originals
from .runtime import Runtime
from .store import open_or_write

log = logging.getLogger(__name__)


def stage_roots(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of pipeline component ``name`` that its pipeline calls through ``__call__``: the component
    itself, or an autoencoder's ``encoder`` and ``decoder``."""
    if callable(getattr(module, "decode", None)) and isinstance(getattr(module, "decoder", None), nn.Module):
        return [(f"{name}.{part}", getattr(module, part)) for part in ("encoder", "decoder")
                if isinstance(getattr(module, part, None), nn.Module)]
    return [(name, module)]


def resident_bytes(module: nn.Module, roots: list[nn.Module]) -> int:
    """Bytes of ``module``'s parameters and persistent buffers outside ``roots`` (they stay in memory)."""
    inside = {id(t) for r in roots for t in [*r.parameters(), *r.buffers()]}
    tensors = {id(t): t for t in [*module.parameters(), *(b for _, b in _persistent_buffers(module))]}
    return sum(t.numel() * t.element_size() for i, t in tensors.items() if i not in inside and not t.is_meta)


def _persistent_buffers(module: nn.Module) -> list[tuple[str, Any]]:
    out = []
    for prefix, m in module.named_modules():
        out += [(f"{prefix}.{n}", b) for n, b in m._buffers.items()
                if b is not None and n not in m._non_persistent_buffers_set]
    return out


class Stage:
    """One streamed module of a pipeline (see the module docstring).

    Args:
        name: ``"text_encoder"``, ``"transformer"``, ``"vae.decoder"``, ...
        module: the module, its weights in memory.
        store: the directory its block store is written to.
        config, partitioner: as ``blockrt.run``.
    """

    def __init__(self, name: str, module: nn.Module, store: Path, config: RunConfig, partitioner: Any = None) -> None:
        self.name = name
        self.module = module
        self.store = store
        self.config = config
        self.partitioner = partitioner
        self.plan: Plan = partition(module, target_bytes=config.target_block_bytes, partitioner=partitioner,
                                    pin=config.pin)
        self.runtime: Runtime | None = None
        self.activations = 0
        self.peak_ledger_bytes = 0
        self.passes = 0
        self.bytes_loaded = 0
        self._originals: Originals | None = None

    def spill(self) -> None:
        """Write the store from the module's weights, keep what restores them, and leave placeholders."""
        storage = {b.name: self.config.storage_for(b.name) for b in self.plan.blocks}
        binder = Binder(self.module)
        tensors = {k: binder.tensor(k).detach() for k in self.plan.all_specs()}
        packed = packed_keys(self.module, self.plan) if self.config.packed_compute else frozenset()
        source = open_or_write(self.store, self.plan, tensors, stored_dtypes(self.plan, storage, packed), storage,
                               verify=self.config.verify != "never")
        del tensors
        self._originals = keep_originals(self.module, self.plan, {}, source, str(self.store.parent))
        binder.evict(self.plan.all_specs().values(), f"stage {self.name!r} (not running)")

    def activate(self, budget: int) -> Runtime:
        """Open the runtime streaming this stage from its store under ``budget``."""
        self.runtime = Runtime(self.module, budget, weights=self.store, partitioner=self.partitioner,
                               config=self.config)
        self.activations += 1
        return self.runtime

    def deactivate(self) -> None:
        """Close the runtime and drop the pinned part it bound: the stage holds nothing afterwards."""
        rt, self.runtime = self.runtime, None
        if rt is None:
            return
        try:
            self.record(rt)
            rt.close()
        finally:
            Binder(self.module).evict(self.plan.pinned, "an offloaded stage's pinned part (not running)")

    def record(self, rt: Runtime) -> None:
        """Fold a closing runtime's figures into the stage's totals."""
        passes, loaded, peak = _figures(rt)
        self.passes += passes
        self.bytes_loaded += loaded
        self.peak_ledger_bytes = max(self.peak_ledger_bytes, peak)

    def figures(self) -> dict[str, int]:
        """Runtimes opened, passes, bytes loaded, peak ledger (closed runtimes and the open one so far), blocks."""
        passes, loaded, peak = _figures(self.runtime) if self.runtime is not None else (0, 0, 0)
        return {"activations": self.activations, "passes": self.passes + passes,
                "bytes_loaded": self.bytes_loaded + loaded, "peak_ledger_bytes": max(self.peak_ledger_bytes, peak),
                "blocks": len(self.plan.blocks)}

    def restore(self) -> None:
        """Give the module its original weights back (the same objects, dtypes, devices and values)."""
        self.deactivate()
        if self._originals is not None:
            self._originals.restore(Binder(self.module))


def _figures(rt: Runtime) -> tuple[int, int, int]:
    """Completed passes, bytes loaded, peak ledger of a runtime."""
    s = rt.profile.summary()  # over the completed passes (none yet: zeros)
    return s.passes, s.bytes_loaded, rt.ledger.peak
