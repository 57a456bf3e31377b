"""One-dimensional k-means for weight palettisation, without scikit-learn.

coremltools' ``mode="kmeans"`` palettiser needs scikit-learn (or ``kmeans1d`` for fp16 weights); blockrt
passes this function as its ``lut_function`` instead (``mode="custom"``). Scalar k-means is cheap exactly:
sort once, then each Lloyd iteration is a ``searchsorted`` for the cluster boundaries (midpoints between
sorted centroids) and segment means from a prefix sum, O(k log n) per iteration after the O(n log n) sort.
Centroids start at the values' quantiles, so the result is deterministic.
"""

from __future__ import annotations

import numpy as np
import torch

MAX_ITERS = 50
TOL = 1e-7  # stop when no centroid moves by more than this fraction of the value range


def kmeans_1d(values: np.ndarray, k: int, iters: int = MAX_ITERS) -> tuple[np.ndarray, np.ndarray]:
    """Cluster the scalars of ``values`` into ``k`` centroids.

    Returns:
        ``(lut, indices)``: ``lut`` of shape (k,) sorted ascending, in ``values``' dtype (repeated entries when
        there are fewer than k distinct values); ``indices`` of shape (values.size,), the nearest centroid of
        each value in row-major order, as uint8 when k <= 256 else int64.
    """
    if k < 1:
        raise ValueError(f"k-means needs k >= 1 clusters, got {k}")
    x = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64).reshape(-1))  # (N,)
    n = x.numel()
    if n == 0:
        raise ValueError("k-means of an empty weight")
    s, _ = torch.sort(x)
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), s.cumsum(0)])  # (N + 1,)
    c = s[((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).long().clamp(max=n - 1)]  # quantiles, (k,)
    tol = TOL * float(s[-1] - s[0]) if n > 1 else 0.0
    for _ in range(iters):
        edges = torch.searchsorted(s, (c[1:] + c[:-1]) / 2)  # (k-1,): first sorted index of clusters 1..k-1
        lo = torch.cat([torch.zeros(1, dtype=torch.long), edges])
        hi = torch.cat([edges, torch.full((1,), n, dtype=torch.long)])
        count = hi - lo
        new = torch.where(count > 0, (csum[hi] - csum[lo]) / count.clamp(min=1), c)
        new, _ = torch.sort(new)
        moved = float((new - c).abs().max())
        c = new
        if moved <= tol:
            break
    idx = torch.searchsorted((c[1:] + c[:-1]) / 2, x)  # (N,): nearest centroid of each value
    lut = c.numpy().astype(values.dtype)
    return lut, idx.numpy().astype(np.uint8 if k <= 256 else np.int64)
