"""Data in and out: prompt sources, per-index noise, the sharded pairs dataset, image-text data."""
