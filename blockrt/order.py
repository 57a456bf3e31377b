"""The order blocks run in, learned from what runs (not assumed cyclic in plan order).

Every block the runtime acquires is observed; the transition from the block acquired before it is
remembered as that block's successor (the last observed transition wins), and whether a pass ended in
between (the transition crosses into the next pass). Blocks called outside a pass (a T5 encoder called
through ``model.get_encoder()``, not through the root module's forward) belong to the pass that follows. A block with no observed successor falls back to plan
order (``i + 1``, after the last block: block 0 of the next pass), so a first pass streams as before.

What the runtime asks: ``upcoming(i)``, the blocks predicted after block ``i`` in order, each once (the chain
of successors up to its first repetition, at most every block), with whether a pass boundary lies before it.
The chain is cached until a transition changes, so a steady loop (a denoising loop, decode steps) pays a
dictionary lookup per block. This covers an encoder run once then a decoder per token (the encoder's last
block leads to the decoder's first, the decoder's last to its own first), CFG, two stacks, modules
registered in another order than they run, and a sequence repeated inside a pass (a chunked decoder: the last
up-block leads back to the first; the exit after the last chunk is predicted wrong once per pass).

A block is released after its last module returns. Which module that is is learned too (``ends_block``): plan
order names it until a pass has run, then the module that returned last in the block's previous pass does. Flux
packs ``x_embedder`` and ``time_text_embed`` into one block but runs them in the other order than registered;
the first would otherwise release the block and the second read it again, every pass.
"""

from __future__ import annotations

START = -1  # the position before the first block of a pass (``upcoming(START)``: what a pass starts with)


class Order:
    """Successor map over ``n`` blocks, learned from observed acquisitions; used from the compute thread."""

    def __init__(self, n: int, last_modules: list[str] | None = None) -> None:
        self.n = n
        self._last_module = list(last_modules or [""] * n)  # the module after which block i is released
        self._returned: dict[int, str] = {}  # block -> its module that returned last in this pass
        self._next = [(i + 1) % n for i in range(n)] + [0]  # index n stands for START
        self._crosses = [i == n - 1 for i in range(n)] + [False]  # START is already in the pass it starts
        self._prev: int | None = None
        self._boundary = True  # a pass ended since the last observed block
        self._chains: dict[int, tuple[tuple[int, bool], ...]] = {}

    def pass_ended(self) -> None:
        """A pass ended: the next observed block starts the next one; each block's last module is the one that
        returned last in this pass."""
        self._boundary = True
        for i, path in self._returned.items():
            self._last_module[i] = path
        self._returned.clear()

    def ends_block(self, i: int, path: str) -> bool:
        """Module ``path`` of block ``i`` returned: is it the block's last (release the block now)?"""
        self._returned[i] = path
        return path == self._last_module[i]

    def observe(self, i: int) -> None:
        """Block ``i`` is acquired now: learn the transition from the block before it."""
        prev = self._prev
        if prev is not None and (self._next[prev] != i or self._crosses[prev] != self._boundary):
            self._next[prev], self._crosses[prev] = i, self._boundary
            self._chains.clear()
        if self._boundary and self._next[self.n] != i:
            self._next[self.n] = i  # what a pass starts with
            self._chains.clear()
        self._prev, self._boundary = i, False

    def successor(self, i: int) -> int:
        """The block predicted right after block ``i`` (``START``: the first block of a pass)."""
        return self._next[self.n if i == START else i]

    def upcoming(self, i: int) -> tuple[tuple[int, bool], ...]:
        """``(block, crossed)`` predicted after block ``i`` (or ``START``), each block once, in order; ``crossed``:
        a pass boundary lies between ``i`` and that block (a prefetch for the next pass; from ``START`` the first
        block is in the pass that starts)."""
        chain = self._chains.get(i)
        if chain is None:
            out: list[tuple[int, bool]] = []
            seen: set[int] = set()
            at, crossed = (self.n if i == START else i), False
            for _ in range(self.n):
                crossed = crossed or self._crosses[at]
                at = self._next[at]
                if at in seen:
                    break
                seen.add(at)
                out.append((at, crossed))
            chain = self._chains[i] = tuple(out)
        return chain

    def distance(self, i: int) -> dict[int, int]:
        """Block -> how many blocks ahead of ``i`` it is predicted (absent: not predicted to run soon)."""
        return {j: k for k, (j, _) in enumerate(self.upcoming(i))}
