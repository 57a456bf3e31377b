"""``CheckpointError``: what is wrong with a checkpoint directory, every problem of one kind in one message."""

from __future__ import annotations

from pathlib import Path

from blockrt.errors import StoreError

SHOWN = 20  # items listed per kind of problem


class CheckpointError(StoreError):
    """A checkpoint directory is incomplete, damaged, unsafe to read, or does not match the model."""


def listing(title: str, items: list[str]) -> str:
    """One line of a message: ``title``, how many ``items``, and the first ``SHOWN`` of them."""
    shown = items[:SHOWN] + ([f"... and {len(items) - SHOWN} more"] if len(items) > SHOWN else [])
    return f"  {title} ({len(items)}): " + "; ".join(shown)


def contents(d: Path) -> str:
    """The names in directory ``d``, sorted, for messages (``nothing`` when it is empty or absent)."""
    names = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
    return ", ".join(names) if names else "nothing"
