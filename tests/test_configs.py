"""Every shipped YAML config parses against its script's schema (no unknown keys, right types)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.config import parse_config

ROOT = Path(__file__).resolve().parents[1]


def _schemas():
    from distill.generate_pairs import PairsConfig
    from distill.sample import SampleConfig
    from distill.train_student import StudentConfig

    return {"pairs": PairsConfig, "student": StudentConfig, "sample": SampleConfig}  # eval, latent_lpips: own tests


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
