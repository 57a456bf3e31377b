"""The exceptions blockrt raises. Each message names what was expected, what was found and the fix.

``BlockrtError`` and ``PartitionError`` are defined with the partitioners (the bottom layer) and re-exported.
"""

from .partitioners.errors import BlockrtError, PartitionError

__all__ = ["BlockrtError", "BudgetError", "DiskFullError", "LoadError", "NotCachedError", "PartitionError", "RestoreError",
           "StoreError"]


class BudgetError(BlockrtError):
    """The memory budget cannot hold what a run needs; the message gives the smallest budget that would."""


class StoreError(BlockrtError):
    """A block store or checkpoint is missing, incomplete, corrupt, or belongs to other weights."""


class LoadError(BlockrtError):
    """A block failed to load on the loader thread; the message names the block and the file."""


class DiskFullError(StoreError, OSError):
    """No space left for a store: names the path, the bytes needed and the bytes free. Also an ``OSError`` with
    ``errno.ENOSPC``, so code that handles a full disk as an ``OSError`` still does."""


class RestoreError(BlockrtError):
    """``close`` could not give an in-memory model all its weights back (a store file gone, say): names the
    tensors left as ``meta`` placeholders and why; everything else was restored and the runtime is closed."""


class NotCachedError(BlockrtError):
    """A model id given to ``blockrt.from_pretrained`` is not in the local Hugging Face cache (blockrt reads the
    cache offline and never downloads): names the id, the cache searched and the command that fetches it."""
