"""blockrt: run transformers that do not fit in memory, block by block, with outputs identical to the plain model.

    import blockrt
    with blockrt.run(model, budget="3.3GB") as rt:
        out = rt(x)
        print(rt.profile)
"""

__version__ = "0.1.0"

from .budget import parse_budget  # noqa: E402
from .config import RunConfig  # noqa: E402
from .errors import BlockrtError, BudgetError, LoadError, PartitionError, StoreError  # noqa: E402
from .plan import Block, Plan, TensorSpec  # noqa: E402
from .profile import Profile, Summary  # noqa: E402
from .runtime import Runtime, run  # noqa: E402
from .skeleton import meta_weights  # noqa: E402

__all__ = [
    "Block", "BlockrtError", "BudgetError", "LoadError", "PartitionError", "Plan", "Profile", "RunConfig",
    "Runtime", "StoreError", "Summary", "TensorSpec", "meta_weights", "parse_budget", "run", "__version__",
]
