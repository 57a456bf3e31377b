"""Capturing blocks from one pass of a model: what enters and leaves each block, as replayable modules.

One forward pass runs with a forward pre-hook (``with_kwargs=True``) and a forward hook on every module of
every block of the plan, recording each call's arguments and outputs, and with a ``TorchDispatchMode``
that notes which tensors ops outside the blocks read (the model's own code and its pinned modules, e.g. a
final norm). Tensors are matched by identity. For each block:

- its **inputs** are the tensor leaves of its calls' arguments that no earlier call of the same block
  produced (hidden states, and e.g. T5's ``position_bias`` and attention mask passed as kwargs);
- its **outputs** are the tensor leaves of its calls' outputs that are used later: by a later block, by
  ops outside the blocks, or returned by the model; plus everything its last call returns (the block's
  result), less tensors that were already inputs (a ``position_bias`` passed straight through);
- each input's **source** is the earlier block output it is (identity), a model input (``input:<arg>``),
  or something computed outside the blocks (``pinned:<name>``: embeddings, masks, rotary tables).

Non-tensor arguments are baked into the replay as constants. ``capture_blocks`` works on a model in
memory and on one streamed by a ``blockrt.Runtime`` (the pass runs through the runtime's own hooks).
Every recorded tensor is held until the capture returns: one pass's boundary activations.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_flatten_with_path, tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from ..partitioners.plan import Block, Plan
from .replay import CONST, SLOT, ReplayModule, Step
from .spec import ExportError

PINNED = "pinned:"  # wiring source prefix: computed outside every block (pinned modules, the model's own code)
MODEL_INPUT = "input:"


@dataclass
class Call:
    """One recorded call of a block's module."""

    block: int
    path: str
    module: nn.Module
    args: tuple
    kwargs: dict
    output: Any = None
    names: dict[int, str] = field(default_factory=dict)  # id(tensor leaf) -> the argument name it was passed as


@dataclass
class CapturedBlock:
    """One block as captured from a pass, ready to become an ``ExportBlock``.

    Attributes:
        index / block: the block's position and entry in the plan.
        name: a package-friendly name derived from the plan's (``encoder.block.0-1`` -> ``encoder_block_0_1``).
        module: the ``ReplayModule``; ``module(*example_inputs)`` reproduces ``expected_outputs``.
        example_inputs / input_names / sources: the block's inputs as captured, their names, and where each
            comes from (``"<block name>.<output name>"``, ``"input:<model argument>"`` or ``"pinned:<name>"``).
        expected_outputs / output_names: the outputs recorded in the pass, and their names.
    """

    index: int
    block: Block
    name: str
    module: ReplayModule
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    sources: tuple[str, ...]
    expected_outputs: tuple[torch.Tensor, ...]
    output_names: tuple[str, ...]

    def replay_equal(self) -> bool:
        """Run the replay on the captured inputs (the block's weights must be bound) and compare with
        ``torch.equal`` against the outputs recorded in the pass."""
        with torch.no_grad():
            got = self.module(*self.example_inputs)
        return len(got) == len(self.expected_outputs) and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, self.expected_outputs))


class _UsesOutside(TorchDispatchMode):
    """Records which watched tensors (block outputs, held alive by the records, so their ids are unique for
    the whole pass) are read by ops that run outside every block call (``depth == 0``)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.watch: set[int] = set()
        self.ids: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth == 0:
            for leaf in tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor) and id(leaf) in self.watch:
                    self.ids.add(id(leaf))
        return func(*args, **kwargs)


def package_name(block_name: str) -> str:
    """A package stem from a plan block name: runs of other characters become ``_``."""
    name = re.sub(r"[^A-Za-z0-9_]+", "_", block_name).strip("_") or "block"
    return name if re.match(r"[A-Za-z_]", name) else f"block_{name}"


def _ident(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_") or "x"
    return name if re.match(r"[A-Za-z_]", name) else f"x_{name}"


def _arg_names(fn: Any, args: tuple, kwargs: dict) -> dict[int, str]:
    """id(tensor leaf) -> a readable name from ``fn``'s signature (``hidden_states``, ``position_embeddings_1``)."""
    try:
        sig = inspect.signature(fn)
        bound = sig.bind_partial(*args, **kwargs).arguments
        var_kw = {n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD}
    except (TypeError, ValueError):
        bound, var_kw = {"args": args, **kwargs}, set()
    out: dict[int, str] = {}
    for path, leaf in tree_flatten_with_path(dict(bound))[0]:
        if isinstance(leaf, torch.Tensor) and id(leaf) not in out:
            keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
            if keys and keys[0] in var_kw:
                keys = keys[1:]
            out[id(leaf)] = _ident("_".join(keys))
    return out


def _unique(name: str, taken: set[str]) -> str:
    out, k = name, 1
    while out in taken:
        out, k = f"{name}_{k}", k + 1
    taken.add(out)
    return out


def record_pass(model: nn.Module, plan: Plan, call: Any, args: tuple, kwargs: dict) -> tuple[list[Call], set[int], Any]:
    """Run ``call(*args, **kwargs)`` once with recording hooks on every block module of ``plan``.

    Returns the outermost calls of block modules in order, the ids of tensors read outside the blocks, and
    the pass's result.
    """
    calls: list[Call] = []
    uses = _UsesOutside()
    handles = []

    def pre(i: int, path: str, mod: nn.Module, a: tuple, kw: dict) -> None:
        uses.depth += 1
        if uses.depth == 1:
            c = Call(i, path, mod, a, dict(kw))
            c.names = _arg_names(mod.forward, a, kw)
            calls.append(c)

    def post(mod: nn.Module, a: tuple, kw: dict, out: Any) -> None:
        uses.depth -= 1
        if uses.depth == 0 and calls and calls[-1].module is mod and calls[-1].output is None:
            calls[-1].output = out
            uses.watch.update(id(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor))

    try:
        for i, block in enumerate(plan.blocks):
            for path in block.modules:
                mod = model.get_submodule(path)
                handles.append(mod.register_forward_pre_hook(
                    lambda m, a, kw, i=i, path=path: pre(i, path, m, a, kw), with_kwargs=True))
                handles.append(mod.register_forward_hook(post, with_kwargs=True, always_call=True))
        with torch.no_grad(), uses:
            result = call(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls, uses.ids, result


def capture_blocks(model: nn.Module, example_args: tuple, example_kwargs: dict | None = None, *,
                   plan: Plan | None = None, runtime: Any = None) -> list[CapturedBlock]:
    """Record one pass of ``model`` and return each block of ``plan`` as a replayable ``CapturedBlock``.

    Args:
        model: the model (in memory), the model a ``runtime`` streams, or that ``blockrt.Runtime`` itself.
        example_args / example_kwargs: one pass's inputs, as for ``model(*args, **kwargs)``.
        plan: the blocks (default: ``runtime.plan``, else one block per layer of the stack or the registered plan).
        runtime: a ``blockrt.Runtime`` streaming ``model``: the pass runs through it (its hooks load each
            block), and the replays bypass its hooks. Replaying then needs the block's weights bound.

    Raises:
        ExportError: a block's modules were not called, or were called again after another block ran.
    """
    from ..runtime import Runtime

    if isinstance(model, Runtime):
        model, runtime = model.model, model
    example_kwargs = dict(example_kwargs or {})
    if plan is None:
        if runtime is not None:
            plan = runtime.plan
        else:
            from blockrt.partitioners import partition
            from blockrt.partitioners.registry import layer_partitioner

            plan = partition(model, partitioner=layer_partitioner(type(model)))  # one package per layer
    call = runtime if runtime is not None else model
    calls, used_outside, result = record_pass(model, plan, call, tuple(example_args), example_kwargs)
    model_inputs = _arg_names(model.forward, tuple(example_args), example_kwargs)
    return build_blocks(plan, calls, used_outside, result, model_inputs)


def _check_order(plan: Plan, calls: list[Call]) -> None:
    seen: list[int] = []
    for c in calls:
        if seen and seen[-1] == c.block:
            continue
        if c.block in seen:
            raise ExportError(f"block {plan.blocks[c.block].name!r} is called again after block "
                              f"{plan.blocks[seen[-1]].name!r} in one pass; exporting needs each block's calls to be "
                              "consecutive (one package per block, run in order)", block=plan.blocks[c.block].name)
        seen.append(c.block)
    missing = [b.name for i, b in enumerate(plan.blocks) if i not in seen]
    if missing:
        raise ExportError(f"blocks {missing} were not called in the example pass; fix: give inputs that run every "
                          "block, or export with a plan that leaves them out")


def build_blocks(plan: Plan, calls: list[Call], used_outside: set[int], result: Any,
                 model_inputs: dict[int, str]) -> list[CapturedBlock]:
    """Turn the recorded calls into one ``CapturedBlock`` per plan block (see the module docstring)."""
    _check_order(plan, calls)
    by_block: dict[int, list[Call]] = {}
    for c in calls:
        by_block.setdefault(c.block, []).append(c)
    readers: dict[int, list[tuple[int, str]]] = {}  # id(tensor) -> (block, argument name) of each call reading it
    for c in calls:
        for leaf in tree_leaves((c.args, c.kwargs)):
            if isinstance(leaf, torch.Tensor):
                readers.setdefault(id(leaf), []).append((c.block, c.names.get(id(leaf), "x")))
    returned = {id(t) for t in tree_leaves(result) if isinstance(t, torch.Tensor)}
    producer: dict[int, tuple[int, str]] = {}  # id(tensor) -> (block index, output name)
    captured: list[CapturedBlock] = []
    for i, block in enumerate(plan.blocks):
        prev = _last_call_names(by_block[i - 1], captured[-1]) if captured else {}
        cb = _build_one(i, block, by_block[i], used_outside, returned, readers, producer, model_inputs, plan, prev)
        captured.append(cb)
    return captured


def _last_call_names(calls: list[Call], cb: CapturedBlock) -> dict[int, str]:
    """Position in the flattened output of a block's last call -> the output name it got."""
    names = {id(t): n for t, n in zip(cb.expected_outputs, cb.output_names)}
    flat, _ = tree_flatten(calls[-1].output)
    return {pos: names[id(t)] for pos, t in enumerate(flat) if isinstance(t, torch.Tensor) and id(t) in names}


def _build_one(i: int, block: Block, calls: list[Call], used_outside: set[int], returned: set[int],
               readers: dict[int, list[tuple[int, str]]], producer: dict[int, tuple[int, str]],
               model_inputs: dict[int, str], plan: Plan, prev_names: dict[int, str]) -> CapturedBlock:
    paths: list[str] = []
    modules: list[nn.Module] = []
    slot_of: dict[int, int] = {}  # id(tensor) -> slot
    inputs: list[torch.Tensor] = []
    input_names: list[str] = []
    taken: set[str] = set()
    # pass 1: inputs, in order of first appearance
    internal: set[int] = set()
    for c in calls:
        for leaf in tree_leaves((c.args, c.kwargs)):
            if isinstance(leaf, torch.Tensor) and not isinstance(leaf, nn.Parameter) and id(leaf) not in internal \
                    and id(leaf) not in slot_of:
                slot_of[id(leaf)] = len(inputs)
                inputs.append(leaf)
                input_names.append(_unique(c.names.get(id(leaf), "x"), taken))
        internal.update(id(t) for t in tree_leaves(c.output) if isinstance(t, torch.Tensor))
    n_slots = len(inputs)
    steps: list[Step] = []
    out_candidates: list[tuple[torch.Tensor, int]] = []
    for k, c in enumerate(calls):
        if c.module not in modules:
            modules.append(c.module)
            paths.append(c.path)
        flat, spec = tree_flatten((c.args, c.kwargs))
        leaves = [(SLOT, slot_of[id(x)]) if isinstance(x, torch.Tensor) and not isinstance(x, nn.Parameter)
                  else (CONST, x) for x in flat]
        out_flat, _ = tree_flatten(c.output)
        out_slots = []
        for pos, t in enumerate(out_flat):
            if isinstance(t, torch.Tensor) and id(t) not in slot_of:
                slot_of[id(t)] = n_slots
                out_slots.append((pos, n_slots))
                out_candidates.append((t, k))
                n_slots += 1
        steps.append(Step(modules.index(c.module), spec, leaves, out_slots))
    input_ids = {id(t) for t in inputs}
    last = len(calls) - 1
    outputs: list[torch.Tensor] = []

    def later_reader(t: torch.Tensor) -> str | None:
        return next((n for b, n in readers.get(id(t), ()) if b > i), None)

    for t, k in out_candidates:
        later = later_reader(t) is not None
        if id(t) in input_ids or any(t is o for o in outputs):
            continue
        if k == last or later or id(t) in used_outside or id(t) in returned:
            outputs.append(t)
    if not outputs:
        raise ExportError(f"block {block.name!r} produced no tensor output in the example pass", block=block.name)
    last_pos = {id(t): pos for pos, t in enumerate(tree_flatten(calls[-1].output)[0]) if isinstance(t, torch.Tensor)}
    output_names = []
    for t in outputs:
        # named after the argument a later block reads it as; else as the previous block named the output at the
        # same position of its last call (so every layer of a stack has the same names); else output_<k>
        base = later_reader(t) or prev_names.get(last_pos.get(id(t), -1)) or \
            ("output" if len(outputs) == 1 else f"output_{len(output_names)}")
        output_names.append(_unique(base if base not in taken else f"{base}_out", taken))
    name = package_name(block.name)
    for t, n in zip(outputs, output_names):
        producer[id(t)] = (i, n)
    sources = []
    for t, n in zip(inputs, input_names):
        if id(t) in producer and producer[id(t)][0] < i:
            j, out = producer[id(t)]
            sources.append(f"{package_name(plan.blocks[j].name)}.{out}")
        elif id(t) in model_inputs:
            sources.append(f"{MODEL_INPUT}{model_inputs[id(t)]}")
        else:
            sources.append(f"{PINNED}{n}")
    module = ReplayModule(paths, modules, steps, len(inputs), [slot_of[id(t)] for t in outputs], n_slots)
    return CapturedBlock(i, block, name, module, tuple(inputs), tuple(input_names), tuple(sources), tuple(outputs),
                         tuple(output_names))
