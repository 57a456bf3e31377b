"""Entry points: the modules whose calls make a block resident, and the errors when a weight is used elsewhere.

A block is entered through its own modules (``Block.modules``) and also through every module inside them
that directly owns one of the block's tensors: a model may call such a module on its own, outside the
block's main call (diffusers' ``DiTTransformer2DModel`` calls ``transformer_blocks[0].norm1.emb`` after the
block loop), and the runtime then loads the block again for that call. Hooks go on parameter-owning
modules only, so their number stays small.

A block's module used while *another* block runs cannot be served by streaming: ``nested_use_error`` names
what was used, where it belongs, and the fix (``RunConfig(pin=[module path])`` keeps that module resident). A
weight read directly (``self.layer.weight``) outside any hooked call is caught by its evicted placeholder
(``placeholder.py``).

``BlockHooks`` is what the hooks do: the first module of a block acquires it (releasing the block before it),
the module that ends it releases it. While every block is retained and bound and nothing is measured the hooks
come off (``set(False)``), so such a pass costs the root's hooks alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .errors import BlockrtError
from .partitioners.plan import Plan


def owning_modules(plan: Plan, i: int) -> list[str]:
    """Paths of the modules inside block ``i`` that directly own one of its tensors (under any alias), in
    state-dict order, without the block's own modules."""
    keys = set(plan.blocks[i].keys)
    names = [*keys, *(alias for alias, owner in plan.aliases.items() if owner in keys)]
    tops = set(plan.blocks[i].modules)
    paths = dict.fromkeys(k.rpartition(".")[0] for k in sorted(names))
    return [p for p in paths if p and p not in tops]


def entry_points(model: nn.Module, plan: Plan) -> list[tuple[int, str, bool]]:
    """``(block, module path, is_top)`` for every module whose call enters a block; a module object reached
    under two paths is listed once."""
    seen: set[int] = set()
    out: list[tuple[int, str, bool]] = []
    for i, block in enumerate(plan.blocks):
        for path, top in [*((p, True) for p in block.modules), *((p, False) for p in owning_modules(plan, i))]:
            sub = model.get_submodule(path)
            if id(sub) not in seen:
                seen.add(id(sub))
                out.append((i, path, top))
    return out


def install_block_hooks(model: nn.Module, plan: Plan, pre: Callable[[int, str], None],
                        post: Callable[[int, str], None], enter: Callable[[int, str], None]) -> list[Any]:
    """Hook every entry point: a block's own modules get ``pre(i, path)`` and an always-called ``post(i, path)``
    (the runtime asks ``Order.ends_block`` whether it is the block's last); the weight owners inside them only ``enter(i, path)``, a pre-hook (cheap
    on the steady path; a block called from outside its top module still loads). Returns the removable handles."""
    hooks = []
    for i, path, top in entry_points(model, plan):
        sub = model.get_submodule(path)
        if not top:
            hooks.append(sub.register_forward_pre_hook(lambda mod, args, i=i, path=path: enter(i, path)))
            continue
        hooks.append(sub.register_forward_pre_hook(lambda mod, args, i=i, path=path: pre(i, path)))
        hooks.append(sub.register_forward_hook(lambda mod, args, out, i=i, path=path: post(i, path), always_call=True))
    return hooks


class BlockHooks:
    """The blocks' hooks of one runtime and what they do (``residency`` loads and releases, ``retention`` measures);
    ``paused()`` True makes them do nothing (an exporter calling block modules with weights it bound itself)."""

    def __init__(self, model: nn.Module, plan: Plan, residency: Any, retention: Any,
                 paused: Callable[[], bool]) -> None:
        self.model, self.plan, self.residency, self.retention, self.paused = model, plan, residency, retention, paused
        self.running = 0  # calls of the active block's own modules not yet returned
        self.handles: list[Any] = []

    def set(self, on: bool) -> None:
        """Install (``on``) or remove the hooks; either is a no-op when already so."""
        if on and not self.handles:
            self.handles = install_block_hooks(self.model, self.plan, self.pre, self.post, self.enter)
        elif not on and self.handles:
            for h in self.handles:
                h.remove()
            self.handles.clear()

    def all_retained(self) -> bool:
        """Every block retained and bound, and no measurement running: the hooks have nothing to do."""
        return len(self.residency.bound) == len(self.plan.blocks) and not self.retention.measuring

    def pre(self, i: int, path: str) -> None:
        if self.paused():
            return
        active = self.residency.active
        if active is not None and active != i:
            if self.running:
                raise nested_use_error(self.plan, i, path, active)
            self.release(active)
        self.running += 1
        if self.residency.active is None:
            self.residency.acquire(i)
            self.retention.block_started(i)

    def enter(self, i: int, path: str) -> None:
        """A module inside block ``i`` ran: load the block unless active (it stays until the next one or the end)."""
        if not self.paused() and self.residency.active != i:
            self.pre(i, path)
            self.running -= 1

    def post(self, i: int, path: str) -> None:
        if self.paused():
            return
        self.running = max(0, self.running - 1)
        if self.residency.order.ends_block(i, path) and not self.running and self.residency.active == i:
            self.release(i)

    def release(self, i: int) -> None:
        self.retention.block_finished(i)
        self.residency.release(i)


def nested_use_error(plan: Plan, i: int, path: str, running: int) -> BlockrtError:
    """Module ``path`` of block ``i`` was called while block ``running`` computes."""
    keys = [k for k in plan.blocks[i].keys if k.rpartition(".")[0] == path] or list(plan.blocks[i].keys[:3])
    shown = ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
    return BlockrtError(
        f"module {path!r} (weights {shown}) belongs to block {plan.blocks[i].name!r} but was called while block "
        f"{plan.blocks[running].name!r} runs; one block is resident at a time, so a weight shared across blocks "
        f"must stay pinned: pass config=RunConfig(pin=[{path!r}]) (or a partitioner that pins it)"
    )
