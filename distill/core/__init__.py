"""Shared pieces: entry-script configuration, the run-folder lock, loaders of pretrained networks, lazy exports."""
