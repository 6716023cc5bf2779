"""Training machinery shared by the trainers: the loop (loop.py), EMA, per-step seeds and data order, checkpoints."""
