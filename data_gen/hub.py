"""Upload a finished folder (a student pipeline, a pairs dataset) to the Hugging Face Hub as it is on disk.

The folder is already what the Hub expects: a pipeline folder with its model card (``README.md``) and
code, or a pairs folder that ``datasets.load_dataset(repo_id)`` opens (``manifest.json`` + ``data/*.parquet``).
Local-only files are left out: locks, half-written temporaries and datasets' Arrow copy.
"""

from __future__ import annotations

import os

# Never uploaded: the run lock, temporaries of killed writes, datasets' Arrow copy of the shards.
LOCAL_ONLY = [".lock", ".tmp-*", "**/.tmp-*", ".*.tmp-*", ".arrow-cache/**"]


def push_folder(
    folder: str | os.PathLike,
    *,
    repo_id: str,
    repo_type: str = "model",
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload with diffusion2gan-toolkit",
) -> str:
    """Create ``repo_id`` if needed (``repo_type`` model or dataset) and upload ``folder``; returns the commit URL."""
    from huggingface_hub import HfApi

    if repo_type not in ("model", "dataset"):
        raise ValueError(f"repo_type must be model or dataset, got {repo_type!r}")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type=repo_type,
        commit_message=commit_message,
        ignore_patterns=LOCAL_ONLY,
    )
    return str(getattr(info, "commit_url", info))
