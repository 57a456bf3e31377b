"""Sweeps: prompts x seeds x settings generated as independent tasks, serially or on a Ray cluster, resumable."""
