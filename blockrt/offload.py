"""``blockrt.offload(pipe, budget)``: every model of a diffusers pipeline streamed under ONE budget, stage by stage.

How the budget is shared: sequential runtimes, as the Open-Sora pipeline runs T5, STDiT3 and the VAE. A pipeline
calls its models one after another (text encoders, then the transformer or UNet once per step, then the VAE), so
the model being called gets the whole budget (less what stays resident, below) and the one before is closed
first: its slots, retained blocks and pinned part are freed before the next model loads anything. One runtime
per model with a shared ledger was the alternative; it would split the budget between models that never run at
the same time (every idle model holding its pinned part and slots), and each model's retention would fight the
others' for the budget of a step. Switching costs a runtime set-up (opening the store, reading the pinned part,
the first block) each time the pipeline goes from one model to another (a few per image: SD3's three text
encoders run twice with classifier-free guidance); the denoising loop keeps its runtime for all its steps, with
retention across them.

The switch: a forward pre-hook on each stage module (``stages.py``: the component itself, an autoencoder's
encoder and decoder), put first so it runs before anything else: when a module that is not the active one is
called, the active runtime closes and this module's opens, and the new runtime's own pre-hooks (the beginning of
its pass) are run for this very call (torch took the list of hooks before the switch added them).

Where inputs go: the models' weights are ``meta`` placeholders while not streaming, so their ``.device`` says
``meta``; each component gets diffusers' ``_hf_hook.execution_device`` attribute (the protocol accelerate's
sequential offload uses for the same situation), naming ``RunConfig.device``, so ``pipe._execution_device`` and
``get_module_execution_device`` put latents and ids there. ``remove()`` takes it away again.

What stays resident, outside every runtime: an autoencoder's parts other than its encoder and decoder (a few
1x1 convolutions), and a module too small for the partitioner to split into blocks. Their bytes are taken off the
budget, so the runtimes' peak ledger plus them stays within it.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import tempdirs
from .config import RunConfig
from .device import DeviceProfile, resolve_budget
from .errors import BlockrtError, BudgetError, RestoreError
from .stages import Stage, resident_bytes, stage_roots

log = logging.getLogger(__name__)


class _ExecutionDevice:
    """What diffusers reads from ``module._hf_hook``: where a module's inputs go while its weights are elsewhere."""

    def __init__(self, device: str) -> None:
        self.execution_device = torch.device(device)


def offload(pipe: Any, budget: int | str | DeviceProfile, *, config: RunConfig | None = None,
            partitioner: Any = None) -> "Offload":
    """Stream every model of a diffusers pipeline (text encoders, transformer or UNet, VAE) under one budget.

    Args:
        pipe: a diffusers pipeline (anything with a ``components`` dict), its models in memory.
        budget: the one budget (``"3.3GB"``, bytes, ``"iphone15pro"``) every stage runs under in turn.
        config: blockrt knobs applied to every stage (``RunConfig``); ``storage_dtype`` narrows the stores.
        partitioner: as ``blockrt.run``.

    Returns:
        An ``Offload`` handle: the pipeline is used as before (``pipe(prompt, ...)``, same images, torch.equal on
        CPU fp32); ``.remove()`` (or leaving ``with``) gives every model its weights back and takes the hooks away.

    Example:
        >>> with blockrt.offload(pipe, budget="2GB") as off:
        ...     image = pipe("a cat", generator=torch.Generator().manual_seed(0)).images[0]
        ...     print(off.report())
    """
    return Offload(pipe, budget, config=config, partitioner=partitioner)


class Offload:
    """The handle ``blockrt.offload`` returns: ``stages``, ``active``, ``peak_ledger_bytes``, ``resident_bytes``,
    ``report()``, ``release()`` (close the active runtime between calls) and ``remove()``/``close()``/``with``."""

    def __init__(self, pipe: Any, budget: int | str | DeviceProfile, *, config: RunConfig | None = None,
                 partitioner: Any = None) -> None:
        self.pipe = pipe
        self.config = config or RunConfig()
        self.budget, _ = resolve_budget(budget)
        components = getattr(pipe, "components", pipe)
        if not isinstance(components, dict):
            raise BlockrtError(f"blockrt.offload expected a diffusers pipeline (with a components dict) or a dict of "
                               f"modules; found {type(pipe).__name__}; fix: pass the pipeline itself")
        self.modules = {n: m for n, m in components.items() if isinstance(m, nn.Module)}
        if not self.modules:
            raise BlockrtError(f"{type(pipe).__name__} has no torch modules among its components "
                               f"{sorted(components)}; nothing to offload")
        roots = {n: stage_roots(n, m) for n, m in self.modules.items()}
        self._tmpdir = tempdirs.create()
        self._finalizer = weakref.finalize(self, tempdirs.remove, self._tmpdir)  # interpreter exit, SIGTERM
        self.stages: dict[str, Stage] = {}
        self.active: Stage | None = None
        self._hooks: list[Any] = []
        self._marked: list[nn.Module] = []
        self._closed = False
        try:
            seen: set[int] = set()  # a module two components share is one stage
            for pairs in roots.values():
                for stage_name, module in pairs:
                    if id(module) not in seen:
                        seen.add(id(module))
                        stage = Stage(stage_name, module, Path(self._tmpdir) / stage_name, self.config, partitioner)
                        if stage.plan.blocks:  # a module too small to split stays resident, as a VAE's 1x1 convs
                            self.stages[stage_name] = stage
            streamed = [s.module for s in self.stages.values()]
            self.resident_bytes = sum(resident_bytes(m, streamed) for m in self.modules.values())
            self.stage_budget = self.budget - self.resident_bytes
            self._check_floors()  # before anything is written
            for stage in self.stages.values():
                stage.spill()
                self._hooks.append(stage.module.register_forward_pre_hook(self._hook(stage), prepend=True,
                                                                          with_kwargs=True))
            for m in self.modules.values():
                if not hasattr(m, "_hf_hook"):
                    m._hf_hook = _ExecutionDevice(self.config.device)
                    self._marked.append(m)
        except BaseException:
            self.remove()
            raise

    def _check_floors(self) -> None:
        """Every stage must fit the budget on its own: fail now, naming the stage, not in the middle of a call."""
        from .budget import Floor
        from .embedding_rows import row_streamed_tables
        from .loader import BlockLayout

        if self.stage_budget <= 0:
            raise BudgetError(f"budget {self.budget} bytes is below the {self.resident_bytes} bytes that stay resident "
                              "(modules outside every streamed one, such as a VAE's quant convolutions); fix: a "
                              "larger budget")
        for s in self.stages.values():
            big = max((BlockLayout.of(b) for b in s.plan.blocks), key=lambda lay: lay.nbytes)
            n_slots = min(self.config.prefetch_depth + 1, len(s.plan.blocks))
            rows = row_streamed_tables(s.module, s.plan, self.config.row_stream_min_bytes)  # never held whole
            pinned = sum(t.nbytes for t in s.plan.pinned if t.key not in rows)
            try:
                Floor(pinned, big.nbytes, n_slots, 0, 0, big.block.name, self.config.prefetch_depth
                      ).check(self.stage_budget)
            except BudgetError as e:
                raise BudgetError(f"stage {s.name!r}: {e}") from None

    def _hook(self, stage: Stage) -> Any:
        def switch(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self.active is stage:
                return None
            self.release()
            before = set(module._forward_pre_hooks)
            self.active = stage
            stage.activate(self.stage_budget)
            # torch took this call's pre-hooks before the runtime added its own: run them now, in order
            for hid, hook in list(module._forward_pre_hooks.items()):
                if hid in before:
                    continue
                if hid in module._forward_pre_hooks_with_kwargs:
                    out = hook(module, args, kwargs)
                    if out is not None:
                        args, kwargs = out
                else:
                    out = hook(module, args)
                    if out is not None:
                        args = out if isinstance(out, tuple) else (out,)
            return args, kwargs
        return switch

    @property
    def peak_ledger_bytes(self) -> int:
        """The largest ledger any stage's runtime reached, plus what stays resident: never above the budget."""
        return self.resident_bytes + max(f["peak_ledger_bytes"] for f in self.report().values())

    def release(self) -> None:
        """Close the active stage's runtime (its memory is freed); the next call of any model opens its own."""
        stage, self.active = self.active, None
        if stage is not None:
            stage.deactivate()

    def report(self) -> dict[str, dict[str, int]]:
        """Per stage: runtimes opened, passes, bytes loaded, peak ledger and blocks (``Stage.figures``)."""
        return {name: s.figures() for name, s in self.stages.items()}

    def remove(self) -> None:
        """Take the hooks away and give every model its original weights back; the pipeline then runs as it did
        before ``offload``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.release()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for m in self._marked:
            if isinstance(getattr(m, "_hf_hook", None), _ExecutionDevice):
                del m._hf_hook
        self._marked.clear()
        failed: list[str] = []
        for s in self.stages.values():
            try:
                s.restore()
            except BlockrtError as e:  # the other stages are still restored
                failed.append(f"{s.name}: {e}")
        if failed:
            self._finalizer.detach()  # the stores hold the only copy of what was not given back: keep them
            raise RestoreError(f"blockrt.offload could not give back every weight; the stores are kept in "
                               f"{self._tmpdir}; " + " | ".join(failed))
        self._finalizer()  # the stores go

    close = remove

    def __enter__(self) -> "Offload":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

