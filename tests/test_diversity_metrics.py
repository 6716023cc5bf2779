"""Mode collapse in numbers: improved precision/recall and per-prompt diversity, on hand-made features with
known answers, and through ``distill/evaluate.py`` in the FID feature space."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_script

from distill.metrics.diversity import group_diversity, mean_pairwise_distance
from distill.metrics.precision_recall import knn_radii, precision_recall


def _points(n: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # [n,dim]


# ---- precision / recall (Kynkäänniemi et al. 2019)


def test_identical_sets_have_precision_and_recall_one():
    real = _points(60)
    assert precision_recall(real_features=real, generated_features=real.clone(), k=3) == (1.0, 1.0)


def test_a_collapsed_generator_is_precise_but_has_no_recall():
    real = _points(50)
    # Every sample next to the same real point: realistic (inside the real manifold), covering one real image of 50.
    collapsed = real[7] + 1e-4 * _points(40, seed=1)
    precision, recall = precision_recall(real_features=real, generated_features=collapsed, k=3)
    assert precision == 1.0 and recall <= 1 / 50


def test_disjoint_far_sets_score_zero():
    real = _points(40)
    assert precision_recall(real_features=real, generated_features=_points(30, seed=2) + 1000.0, k=3) == (0.0, 0.0)


def test_chunking_does_not_change_the_answer():
    real, fake = _points(70), _points(45, seed=3) * 1.2 + 0.5  # overlapping, neither inside the other
    brute = torch.cdist(real, real).kthvalue(4, dim=1).values  # self at 0, then the 1st..3rd neighbours
    torch.testing.assert_close(knn_radii(features=real, k=3, chunk_size=8), brute)
    whole = precision_recall(real_features=real, generated_features=fake, k=3, chunk_size=4096)
    assert precision_recall(real_features=real, generated_features=fake, k=3, chunk_size=7) == whole
    assert 0 < whole[0] < 1 and 0 < whole[1] < 1


def test_too_few_points_for_k_is_one_clear_error():
    with pytest.raises(ValueError, match="more than k=3 points"):
        precision_recall(real_features=_points(3), generated_features=_points(10), k=3)


# ---- per-group diversity


def test_group_diversity_is_the_hand_computed_mean_pairwise_distance():
    triangle = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]  # sides 3, 4, 5: mean 4
    pair = [[1.0, 1.0], [1.0, 3.0]]  # one pair at distance 2
    features = torch.tensor([triangle[0], pair[0], triangle[1], [9.0, 9.0], pair[1], triangle[2]], dtype=torch.float64)
    groups = ["a", "b", "a", "c", "b", "a"]  # "c" has one sample: no pairs, left out
    assert group_diversity(features=features, groups=groups, chunk_size=2) == pytest.approx({"a": 4.0, "b": 2.0})
    assert mean_pairwise_distance(features=torch.tensor(triangle), chunk_size=1) == pytest.approx(4.0)
    collapsed = torch.ones(5, 3)
    assert mean_pairwise_distance(features=collapsed) == 0.0


def test_diversity_against_the_real_images_of_the_same_classes():
    from distill.metrics.sample_scores import compute_diversity

    # Samples: class 0 a pair at distance 1, class 1 a pair at distance 3 -> diversity 2.
    fake = np.array([[0, 0], [1, 0], [0, 0], [0, 3]], dtype=np.float64)
    # Real: class 0 at distance 2, class 1 at distance 6 -> 4; class 2 (never sampled) is left out.
    real = np.array([[0, 0], [2, 0], [0, 0], [0, 6], [0, 0], [100, 0]], dtype=np.float64)
    values, info = compute_diversity(
        features=fake,
        groups=[0, 0, 1, 1],
        grouping="label",
        real_features=real,
        real_groups=[0, 0, 1, 1, 2, 2],
        device="cpu",
    )
    assert values == pytest.approx({"diversity": 2.0, "diversity_real": 4.0, "diversity_ratio": 0.5})
    assert info["num_groups"] == 2 and info["per_group_real"] == {"0": 2.0, "1": 6.0}


def test_reference_labels_come_from_the_folder_metadata(tmp_path):
    from data_gen.digits import load_digits_images, save_digits_reference
    from distill.metrics.image_io import folder_labels, list_images

    ref = save_digits_reference(tmp_path / "real")
    files = list_images(ref)
    _, labels = load_digits_images(split="held_out")
    assert folder_labels(ref, files) == labels.tolist()
    assert folder_labels(ref, files, column="no-such-column") is None
    assert folder_labels(tmp_path, []) is None  # no metadata.jsonl
    (ref / "extra.png").write_bytes((ref / "0000.png").read_bytes())
    with pytest.raises(ValueError, match="no row for extra.png"):
        folder_labels(ref, list_images(ref))


# ---- through the CLI: in the FID feature space, the real reference shared with FID


@pytest.fixture(scope="module")
def digits_reference(tmp_path_factory) -> Path:
    from data_gen.digits import save_digits_reference

    return save_digits_reference(tmp_path_factory.mktemp("digits") / "real")  # 359 labelled PNGs


def _evaluate(args: list, capsys) -> tuple[int, str, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code, err = run_script("evaluate.py", [*map(str, args)], capsys)
    return code, stdout.getvalue(), err


def test_cli_writes_precision_recall_and_diversity(sd15_teacher, digits_reference, prompt_file, tmp_path, capsys):
    """A tiny teacher on the digits prompts (labelled): fid, precision, recall, diversity and its real counterpart."""
    out = tmp_path / "eval"
    common = [
        "--pipeline",
        sd15_teacher,
        "--num_inference_steps",
        2,
        "--guidance_scale",
        3.0,
        "--batch_size",
        10,
        "--grid_size",
        0,
        "--metric_workers",
        0,
        "--fid_extractor",
        "random-tiny",
        "--metrics_cache",
        tmp_path / "cache",
        "--reference",
        digits_reference,
    ]
    code, stdout, err = _evaluate(
        [
            *common,
            "--prompts",
            ROOT / "configs/digits/prompts.jsonl",
            "--num_samples",
            20,
            "--metrics",
            "fid,precision_recall,diversity",
            "--output_dir",
            out,
        ],
        capsys,
    )
    assert code == 0, err
    result = json.loads((out / "metrics.json").read_text())
    values, details = result["metrics"], result["details"]
    assert set(values) == {"fid", "precision", "recall", "diversity", "diversity_real", "diversity_ratio"}
    for name in values:  # one `name: value` line each
        assert any(line.startswith(f"{name}: ") for line in stdout.splitlines()), stdout
    assert values["fid"] > 0 and 0 <= values["precision"] <= 1 and 0 <= values["recall"] <= 1
    assert values["diversity"] > 0 and values["diversity_real"] > 0
    assert values["diversity_ratio"] == pytest.approx(values["diversity"] / values["diversity_real"])
    # One feature space for all: the real images' features were extracted once, FID read their statistics.
    extractor_id = details["fid"]["extractor_id"]
    assert details["precision_recall"]["extractor_id"] == details["diversity"]["extractor_id"] == extractor_id
    assert details["fid"]["source"] == "cache" and details["fid"]["cache"].endswith(".npz")
    assert details["precision_recall"] == {**details["precision_recall"], "k": 3, "num_samples": 20, "num_real": 359}
    # The first 20 of the 50 prompts are digits 0-3, five phrasings each: grouped by label against real 0-3.
    div = details["diversity"]
    assert div["grouping"] == "label" and sorted(div["per_group"]) == ["0", "1", "2", "3"] and "note" not in div
    assert sorted(div["per_group_real"]) == ["0", "1", "2", "3"]

    # Unlabelled prompts (a .txt file, 4 prompts, each drawn twice): grouped by prompt text, diversity alone, and
    # the metric info says why.
    code, _, err = _evaluate(
        [
            *common,
            "--prompts",
            prompt_file,
            "--num_samples",
            8,
            "--metrics",
            "diversity",
            "--output_dir",
            tmp_path / "text",
        ],
        capsys,
    )
    assert code == 0, err
    result = json.loads((tmp_path / "text" / "metrics.json").read_text())
    assert set(result["metrics"]) == {"diversity"} and result["metrics"]["diversity"] > 0
    div = result["details"]["diversity"]
    assert div["grouping"] == "prompt" and div["num_groups"] == 4 and "a photo of a cat" in div["per_group"]
    assert "grouped by prompt text" in div["note"] and "no real counterpart" in div["note"]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--metrics", "precision_recall", "--reference", "no-such-folder"], "precision_recall needs `reference`"),
        (["--metrics", "precision_recall", "--pr_k", 0], "pr_k must be positive"),
        (["--metrics", "precision_recall", "--num_samples", 3], "more than pr_k=3 samples"),
        (["--metrics", "diversity", "--num_samples", 4], "diversity needs at least 2 samples of one prompt"),
    ],
)
def test_bad_config_fails_in_one_line_before_generating(
    sd15_teacher, digits_reference, prompt_file, tmp_path, capsys, extra, needle
):
    out = tmp_path / "err"
    code, _, err = _evaluate(
        [
            "--pipeline",
            sd15_teacher,
            "--prompts",
            prompt_file,
            "--reference",
            digits_reference,
            "--fid_extractor",
            "random-tiny",
            "--output_dir",
            out,
            *extra,
        ],
        capsys,
    )
    last = err.rstrip("\n").split("\n")[-1]
    assert code == 2 and last.startswith("error: ") and needle in last and "Traceback" not in err, err
    assert not list(out.glob("samples/*.png"))
