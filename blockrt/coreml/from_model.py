"""``export_model``: every block of a model's plan as a CoreML package, captured from one pass.

The generic path of the exporter: one pass records each block's boundary tensors (``capture.py``), each
block becomes an ``ExportBlock`` around its ``ReplayModule``, and ``export_blocks`` converts them in order,
with the wiring between packages taken from the capture. The model may be

- in memory: its weights are used where they are;
- a skeleton (weights on ``meta``) with ``weights=`` a checkpoint or blockrt store: a ``blockrt.run``
  runtime streams the capture pass, and while a block is traced and converted only that block's tensors are
  read from the source and bound (``binding.Binder``), then evicted again;
- a ``blockrt.Runtime``: the same, through the caller's runtime (left open).

Pinned modules (embeddings, final norms, heads) are not exported: the manifest lists their tensors in
``pinned`` and the inputs they compute as ``pinned:<name>`` sources, for the app to run itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from ..binding import Binder
from ..partitioners.plan import Block, Plan
from .capture import CapturedBlock, capture_blocks
from .export import Progress, export_blocks
from .manifest import ExportManifest
from .spec import ExportBlock, ExportError, ExportOptions

UNLIMITED = 1 << 62  # the capture pass's budget when none is given: only the runtime's own accounting uses it

ShapeSpec = dict[str, Any] | Callable[[CapturedBlock], dict[str, Any]]


def export_model(model: nn.Module, example_args: tuple, example_kwargs: dict | None, out_dir: str | Path,
                 options: ExportOptions = ExportOptions(), *, plan: Plan | None = None,
                 budget: int | str | None = None, weights: str | Path | None = None, overwrite: bool = False,
                 progress: Progress | None = None, flexible: ShapeSpec | None = None,
                 enumerated: ShapeSpec | None = None, extra: dict | None = None) -> ExportManifest:
    """Export every block of ``model``'s plan to ``<out_dir>/<block>.mlpackage`` with a manifest.

    Args:
        model: a model in memory, a skeleton on ``meta`` (give ``weights``), or a ``blockrt.Runtime``.
        example_args / example_kwargs: one pass's inputs; each block is traced with what reaches it.
        out_dir: the export directory (see ``export_blocks`` for the overwrite rules).
        options: precision, quantization and checks.
        plan: the blocks (default: the runtime's plan, else ``blockrt.partitioners.partition(model)``).
        budget: the streaming runtime's budget for the capture pass (default: unlimited accounting).
        weights: a checkpoint or blockrt store to stream a skeleton's weights from.
        overwrite: replace a previous export in ``out_dir``.
        progress: ``progress(done, total, package_name)`` after each package.
        flexible / enumerated: input name -> shape spec (as ``ExportBlock``), applied to every block that has
            an input of that name; or a function ``CapturedBlock -> {input name: spec}``.
        extra: stored in the manifest's ``extra`` (next to the model class and partitioner).

    Returns:
        The ``ExportManifest``; its ``wiring`` says which package output feeds which input.

    Example:
        >>> manifest = export_model(t5, (), {"input_ids": ids}, "out/t5", ExportOptions(quantize="int8"),
        ...                         flexible={"hidden_states": (1, (1, 512), 4096)})
    """
    with _Session(model, plan, budget, weights) as session:
        captured = capture_blocks(session.model, tuple(example_args), example_kwargs, plan=session.plan,
                                  runtime=session.runtime)
        session.finish_pass()
        wiring = {f"{cb.name}.{n}": src for cb in captured for n, src in zip(cb.input_names, cb.sources)}
        info = {"model_class": session.plan.model_class or type(session.model).__name__,
                "partitioner": session.plan.partitioner}
        with contextlib.closing(_blocks(captured, session, flexible, enumerated)) as blocks:
            return export_blocks(blocks, out_dir, options, overwrite=overwrite, progress=progress, wiring=wiring,
                                 extra={**info, **(extra or {})}, pinned=[t.key for t in session.plan.pinned],
                                 total=len(captured))


def _shapes(spec: ShapeSpec | None, cb: CapturedBlock) -> dict[str, Any]:
    if spec is None:
        return {}
    chosen = spec(cb) if callable(spec) else spec
    return {n: v for n, v in chosen.items() if n in cb.input_names}


def _blocks(captured: list[CapturedBlock], session: "_Session", flexible: ShapeSpec | None,
            enumerated: ShapeSpec | None) -> Iterator[ExportBlock]:
    """Yield one ExportBlock per captured block, with that block's weights bound while it is being exported."""
    for cb in captured:
        with session.bound(cb.block):
            yield ExportBlock(
                cb.name, cb.module, cb.example_inputs, cb.input_names, cb.output_names,
                flexible=_shapes(flexible, cb), enumerated=_shapes(enumerated, cb),
                expected_outputs=cb.expected_outputs,
                meta={"plan_block": cb.block.name, "index": cb.index, "modules": list(cb.block.modules),
                      "plan_bytes": cb.block.nbytes, "sources": dict(zip(cb.input_names, cb.sources))})


class _Session:
    """Where the weights are: in the model, or streamed (a runtime for the pass, its source for binding)."""

    def __init__(self, model: nn.Module, plan: Plan | None, budget: int | str | None,
                 weights: str | Path | None) -> None:
        from ..runtime import Runtime, run

        self.runtime: Runtime | None = None
        self._own_runtime = False
        if isinstance(model, Runtime):
            if weights is not None:
                raise ValueError("pass weights= to blockrt.run, not to export_model, when exporting through a Runtime")
            if plan is not None and plan != model.plan:
                raise ValueError("export_model got a Runtime and a different plan; the runtime streams its own plan")
            self.runtime, self.model, self.plan = model, model.model, model.plan
        elif weights is not None:
            from ..partitioners.registry import layer_partitioner

            partitioner = (lambda m, *, target_bytes=None: plan) if plan is not None else layer_partitioner(type(model))
            self.runtime = run(model, UNLIMITED if budget is None else budget, weights=weights, partitioner=partitioner)
            self._own_runtime = True
            self.model, self.plan = model, self.runtime.plan
        else:
            if budget is not None:
                raise ValueError("budget= only applies when weights are streamed (weights= or a Runtime)")
            if plan is None:
                from blockrt.partitioners import partition

                plan = partition(model)
            self.model, self.plan = model, plan
            on_meta = [k for k in plan.all_specs() if Binder(model).tensor(k).is_meta]
            if on_meta:
                raise ExportError(f"{type(model).__name__} has weights on the meta device ({on_meta[:3]}...) and no "
                                  "weights= was given; fix: pass weights=<checkpoint or blockrt store> to stream them")
        self.binder = Binder(self.model)

    def finish_pass(self) -> None:
        """The capture pass is done: a runtime created here is closed (its slots freed; the source stays)."""
        if self._own_runtime and self.runtime is not None:
            self.runtime.close()

    @contextlib.contextmanager
    def bound(self, block: Block) -> Iterator[None]:
        """Bind ``block``'s tensors for the duration (read from the source when streaming), then evict them; a
        runtime's hooks are paused meanwhile (tracing calls the block's modules outside any pass)."""
        if self.runtime is None:
            yield
            return
        own = not all(_bound(self.binder.tensor(s.key), s) for s in block.tensors)  # else retained: stays bound
        self.runtime.paused = True
        try:
            if own:
                self.binder.materialize((s, self.runtime.read_tensor(s.key)) for s in block.tensors)
            yield
        finally:
            if own:
                self.binder.evict(block.tensors, block.name)
            self.runtime.paused = False

    def __enter__(self) -> "_Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish_pass()


def _bound(t: Any, spec: Any) -> bool:
    """A tensor holds real data of its planned shape (not a meta or emptied placeholder)."""
    return not t.is_meta and tuple(t.shape) == tuple(spec.shape)
