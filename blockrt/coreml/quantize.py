"""Weight compression of a converted ML program with ``coremltools.optimize.coreml``.

``int8``: linear symmetric, one scale per output channel. ``int4``: linear symmetric, one scale per block of
32 input channels (weights whose input dim is not a multiple of 32 are left as they are). ``paletteN``:
k-means palettisation with 2^N entries per tensor
(``kmeans.py``: exact 1-D k-means, so scikit-learn is not needed). Ops listed in ``skip_ops`` (by MIL op type, e.g.
``gather`` for embedding tables) and weights of at most ``min_elements`` elements stay uncompressed.
"""

from __future__ import annotations

from typing import Any

from .kmeans import kmeans_1d

INT4_BLOCK_SIZE = 32


def compression_config(mode: str, skip_ops: tuple[str, ...], min_elements: int) -> Any:
    """The ``OptimizationConfig`` for ``mode`` (one of ``spec.QUANTIZATIONS``)."""
    import coremltools.optimize.coreml as cto

    if mode == "int8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                         weight_threshold=min_elements)
    elif mode == "int4":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                         block_size=INT4_BLOCK_SIZE, weight_threshold=min_elements)
    elif mode.startswith("palette"):
        k = 1 << int(mode.removeprefix("palette"))
        op = cto.OpPalettizerConfig(mode="custom", lut_function=lambda w: kmeans_1d(w, k),
                                    weight_threshold=min_elements)
    else:
        raise ValueError(f"unknown quantization mode {mode!r}")
    return cto.OptimizationConfig(global_config=op, op_type_configs={t: None for t in skip_ops})


def compress(mlmodel: Any, mode: str, skip_ops: tuple[str, ...], min_elements: int) -> Any:
    """Return ``mlmodel`` with its weights compressed by ``mode`` (a new MLModel; the input is left as is)."""
    import coremltools.optimize.coreml as cto

    config = compression_config(mode, skip_ops, min_elements)
    if mode.startswith("palette"):
        return cto.palettize_weights(mlmodel, config)
    return cto.linear_quantize_weights(mlmodel, config)
