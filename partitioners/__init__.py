"""Partitioners: split a model into a Plan of streamable blocks, chosen by model class via a registry.

The per-model partitioners register themselves by class path on import (no optional dependency is
imported here): T5 encoders, STDiT3 and the Open-Sora VAE. Every other model gets the whole-model
partitioner; ``generic_partition`` (the single largest layer stack) stays available to pass explicitly.
"""

from blockrt.partitioners import stdit3, t5, vae  # noqa: F401  (registration)
from blockrt.partitioners.generic import generic_partition
from blockrt.partitioners.pinning import pin_modules
from blockrt.partitioners.registry import partition, register
from blockrt.partitioners.whole_model import whole_model_partition

__all__ = ["generic_partition", "partition", "pin_modules", "register", "whole_model_partition"]
