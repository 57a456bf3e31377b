"""The root of blockrt's exceptions, in the bottom layer so that every layer raises one family.

Imports run one way: ``blockrt.pipelines`` -> ``blockrt`` (the core) -> ``blockrt.partitioners``. The
partitioners import nothing from the core, so the base class lives here; ``blockrt.errors`` re-exports it
with the runtime's own errors. Each message names what was expected, what was found and the fix.
"""


class BlockrtError(Exception):
    """Base class of every blockrt error."""


class PartitionError(BlockrtError):
    """A model cannot be split into blocks by the chosen partitioner."""
