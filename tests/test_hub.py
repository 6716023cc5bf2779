"""--push_to_hub of generate_pairs.py (a Hub dataset) and train_student.py (the student pipeline): what would be
uploaded, checked locally with the Hub client replaced by a recorder; no token reaches any file."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_script


class RecordingHub:
    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw, self.token))

    def upload_folder(self, *, folder_path, repo_id, repo_type, commit_message, ignore_patterns):
        from huggingface_hub.utils import filter_repo_objects

        root = Path(folder_path)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        kept = sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        self.calls.append(("upload_folder", repo_id, dict(repo_type=repo_type, files=kept, root=root), self.token))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    RecordingHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHub)
    return RecordingHub.calls


def test_pairs_and_student_are_pushed_as_they_are_on_disk(sd15_teacher, prompt_file, tmp_path, capsys, hub):
    from data_gen.pairs import load_pairs

    pairs = tmp_path / "pairs"
    args = [
        "--teacher",
        sd15_teacher,
        "--prompts",
        prompt_file,
        "--num_pairs",
        12,
        "--resolution",
        32,
        "--num_inference_steps",
        2,
        "--output_dir",
        pairs,
    ]
    assert run_script("generate_pairs.py", args, capsys)[0] == 0
    load_pairs(pairs)  # leaves datasets' Arrow copy in the folder: not for upload
    code, err = run_script(
        "generate_pairs.py",
        [
            *args,
            "--push_to_hub",
            "--hub_dataset_id",
            "me/digits-pairs",
            "--hub_token",
            "hf_secret",
            "--hub_private_repo",
        ],
        capsys,
    )
    assert code == 0, err
    (create, repo, kw, token), (upload, repo2, up, token2) = hub
    assert (create, repo, kw["repo_type"], kw["private"], token) == (
        "create_repo",
        "me/digits-pairs",
        "dataset",
        True,
        "hf_secret",
    )
    assert up["repo_type"] == "dataset" and up["files"][0] == "data/train-00000-of-00001.parquet"
    assert set(up["files"]) == {"data/train-00000-of-00001.parquet", "generate_pairs.yaml", "manifest.json"}
    assert "hf_secret" not in (pairs / "generate_pairs.yaml").read_text()

    hub.clear()
    run = tmp_path / "run"
    code, err = run_script(
        "train_student.py",
        [
            "--pairs",
            pairs,
            "--output_dir",
            run,
            "--max_train_steps",
            2,
            "--batch_size",
            4,
            "--holdout",
            4,
            "--lpips_network",
            "random",
            "--report_to",
            "none",
            "--push_to_hub",
            "--hub_token",
            "hf_secret",
        ],
        capsys,
    )
    assert code == 0, err
    (_, repo, kw, token), (_, _, up, _) = hub
    assert (repo, kw["repo_type"], kw["private"], token) == (
        "run",
        "model",
        False,
        "hf_secret",
    )  # default id: the folder's name
    assert up["root"] == run / "pipeline" and {"README.md", "model_index.json", "pairs_split.json"} <= set(up["files"])
    assert not any(f.startswith(".") for f in up["files"])
    for f in [run / "config.yaml", run / "pipeline" / "README.md"]:
        assert "hf_secret" not in f.read_text(), f
