"""Partitioners: split a model into a Plan of streamable blocks, chosen by model class via a registry."""

from partitioners.generic import generic_partition
from partitioners.registry import partition, register

__all__ = ["generic_partition", "partition", "register"]
