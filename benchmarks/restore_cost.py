"""What giving an in-memory model back at close costs (``blockrt/restore.py``): seconds and bytes read at close, and
the restore file's bytes and seconds at set-up for a lossy storage dtype, against ``RunConfig(restore=False)``.

    python benchmarks/restore_cost.py [--mb 200]
"""

from __future__ import annotations

import argparse
import time

import torch

import blockrt
from blockrt import RunConfig
from blockrt.pipelines.toy import ToyConfig, ToyTransformer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=200.0, help="model size in MB (fp32)")
    args = ap.parse_args()
    dim = 1024
    per_layer = 12 * dim * dim * 4  # qkv + out + 4x mlp, fp32
    n_layers = max(2, round(args.mb * 1e6 / per_layer))

    def build() -> ToyTransformer:  # the same weights every round (restore=False leaves placeholders behind)
        torch.manual_seed(0)
        return ToyTransformer(ToyConfig(vocab=256, dim=dim, n_layers=n_layers, n_heads=8, max_len=32)).eval()

    ids = torch.randint(0, 256, (1, 16))
    size = sum(p.numel() * p.element_size() for p in build().parameters())
    print(f"model: {size / 1e6:.0f} MB fp32, {n_layers} layers; {torch.get_num_threads()} threads; warm page cache")
    for storage in (None, "int8"):
        for restore in (False, True):
            model = build()
            t0 = time.perf_counter()
            rt = blockrt.run(model, budget="4GB", config=RunConfig(storage_dtype=storage, restore=restore))
            t1 = time.perf_counter()
            rt(ids)
            t2 = time.perf_counter()
            kept = rt._originals
            restore_file = sum(s.nbytes for s in kept.lossy.segments.values()) if kept and kept.lossy else 0
            rt.close()
            t3 = time.perf_counter()
            read = kept.bytes_read if kept else 0
            print(f"storage={storage or 'as computed':11s} restore={restore!s:5s}  set-up {t1 - t0:6.2f} s  "
                  f"pass {t2 - t1:5.2f} s  close {t3 - t2:5.2f} s  read back {read / 1e6:6.0f} MB  "
                  f"restore file {restore_file / 1e6:5.0f} MB")


if __name__ == "__main__":
    main()
