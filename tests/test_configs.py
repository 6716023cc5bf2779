"""Every shipped YAML config parses against its script's schema (no unknown keys, right types)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.config import parse_config

ROOT = Path(__file__).resolve().parents[1]


def _schemas():
    from distill.generate_pairs import PairsConfig
    from distill.sample import SampleConfig
    from distill.train_gan import GANConfig
    from distill.train_student import StudentConfig

    return {"pairs": PairsConfig, "student": StudentConfig, "sample": SampleConfig, "scratch": GANConfig}  # eval, latent_lpips: own tests


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses(path):
    schema = _schemas().get(path.parent.name)
    if schema is None:
        pytest.skip(f"{path.parent.name} configs are checked by their own tests")
    cfg = parse_config(schema, ["--config", str(path)])
    assert isinstance(cfg, schema)


def test_flags_override_yaml_and_types_are_checked(tmp_path):
    from distill.config import ConfigError
    from distill.generate_pairs import PairsConfig

    cfg = parse_config(PairsConfig, ["--config", str(ROOT / "configs/pairs/sd15.yaml"), "--guidance_scale", "2.5"])
    assert cfg.guidance_scale == 2.5 and cfg.scheduler == "ddim"
    with pytest.raises(ConfigError, match="num_pairs"):
        parse_config(PairsConfig, ["--num_pairs", "lots"])


def test_negative_numbers_and_dash_text_are_values_and_bare_booleans_are_true():
    from distill.generate_pairs import PairsConfig
    from distill.train_student import StudentConfig

    cfg = parse_config(StudentConfig, ["--learning_rate_g", "-1e-4", "--holdout", "-5", "--allow_teacher_mismatch",
                                       "--gradient_checkpointing", "false"])
    assert cfg.learning_rate_g == -1e-4 and cfg.holdout == -5  # parsed; the script's range check names them
    assert cfg.allow_teacher_mismatch is True and cfg.gradient_checkpointing is False
    assert parse_config(PairsConfig, ["--negative_prompt", "-blurry", "--seed", "-3"]).negative_prompt == "-blurry"


@pytest.mark.parametrize("text, message", [
    ("teacher: x\nnum_pairs: [1, 2\n", "is not valid YAML at line 3"),
    ("teacher: x\n  bad indent: 1\n", "is not valid YAML at line 2"),
    ("- a list\n- not a mapping\n", "must be a mapping of `key: value` lines"),
])
def test_malformed_yaml_is_one_line_naming_the_file(tmp_path, text, message):
    from distill.config import ConfigError
    from distill.generate_pairs import PairsConfig

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(PairsConfig, ["--config", str(path)])
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_eval_fidelity_rows_are_the_student_configs_holdout():
    """configs/eval score exactly the pairs the matching configs/student held out (the last `holdout` rows)."""
    from omegaconf import OmegaConf

    students = {OmegaConf.load(p).pairs: OmegaConf.load(p) for p in (ROOT / "configs").glob("*/*.yaml")
                if p.parent.name in ("student", "digits") and "holdout" in OmegaConf.load(p)}
    checked = 0
    for path in [*(ROOT / "configs" / "eval").glob("*.yaml"), ROOT / "configs" / "digits" / "eval.yaml"]:
        cfg = OmegaConf.load(path)
        if "fidelity" not in cfg.get("metrics", "fidelity") or cfg.pairs not in students:
            continue
        assert cfg.fidelity_start == -students[cfg.pairs].holdout, path.name
        assert cfg.get("fidelity_count", 0) == 0, path.name
        checked += 1
    assert checked >= 4  # sd15, sd15 teacher, sdxl, digits
