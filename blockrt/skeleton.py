"""Building a model skeleton: parameters on ``meta``, the small computed buffers real.

``with torch.device("meta")`` puts *everything* on meta, also non-persistent buffers that no checkpoint holds
(BERT's ``position_ids``, Llama's rotary ``inv_freq``); ``meta_weights()`` moves only parameters and
persistent buffers, as they are registered.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn

_lock = threading.Lock()


@contextlib.contextmanager
def meta_weights() -> Iterator[None]:
    """Build models whose weights live on ``meta`` (to be streamed with ``blockrt.run(..., weights=...)``).

    Example:
        >>> with blockrt.meta_weights():
        ...     skeleton = LlamaModel(config)
        >>> rt = blockrt.run(skeleton, budget="1GB", weights="llama/")
    """
    register_parameter = nn.Module.register_parameter
    register_buffer = nn.Module.register_buffer

    def meta_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register_parameter(self, name, param)
        p = self._parameters[name]
        if p is not None and not p.is_meta:
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    def meta_buffer(self: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        if tensor is not None and persistent:
            tensor = tensor.to("meta")
        register_buffer(self, name, tensor, persistent)

    with _lock:
        nn.Module.register_parameter = meta_parameter  # type: ignore[method-assign]
        nn.Module.register_buffer = meta_buffer  # type: ignore[method-assign]
        try:
            yield
        finally:
            nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
            nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]
