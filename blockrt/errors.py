"""The exceptions blockrt raises. Each message names what was expected, what was found and the fix."""


class BlockrtError(Exception):
    """Base class of every blockrt error."""


class BudgetError(BlockrtError):
    """The memory budget cannot hold what a run needs; the message gives the smallest budget that would."""


class PartitionError(BlockrtError):
    """A model cannot be split into blocks by the chosen partitioner."""


class StoreError(BlockrtError):
    """A block store or checkpoint is missing, incomplete, corrupt, or belongs to other weights."""


class LoadError(BlockrtError):
    """A block failed to load on the loader thread; the message names the block and the file."""
