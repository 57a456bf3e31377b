"""blockrt: run transformers that do not fit in memory, block by block, with outputs identical to the plain model.

    import blockrt
    with blockrt.run(model, budget="3.3GB") as rt:
        out = rt(x)
        print(rt.profile)
"""

from .version import __version__  # noqa: E402

from .budget import parse_budget  # noqa: E402
from .config import RunConfig  # noqa: E402
from .device import PROFILES, DeviceProfile, get_profile, register_profile  # noqa: E402
from .memory import read_rss  # noqa: E402
from .page_cache import drop_page_cache  # noqa: E402
from .predict import BlockTiming, Prediction, predict, simulate  # noqa: E402
from .errors import BlockrtError, BudgetError, LoadError, PartitionError, RestoreError, StoreError  # noqa: E402
from .partitioners.plan import Block, Plan, TensorSpec  # noqa: E402
from .profile import Profile, Summary  # noqa: E402
from .runtime import Runtime, run  # noqa: E402
from .skeleton import meta_weights  # noqa: E402
from .conversion import convert_store  # noqa: E402
from .pretrained import from_pretrained  # noqa: E402
from .offload import Offload, offload  # noqa: E402
from .errors import NotCachedError  # noqa: E402

__all__ = [
    "PROFILES", "BlockTiming", "DeviceProfile", "Prediction", "drop_page_cache", "get_profile", "predict",
    "read_rss", "register_profile", "simulate", "Block", "BlockrtError", "BudgetError", "LoadError", "PartitionError", "Plan", "Profile", "RestoreError", "RunConfig",
    "NotCachedError", "Offload", "Runtime", "StoreError", "Summary", "TensorSpec", "convert_store", "from_pretrained", "meta_weights", "offload", "parse_budget", "run", "__version__",
]
