"""The shared training loop: steps, checkpoints and exact resume, EMA, seeds, trackers, prefetch, curves, student
registry."""
