"""Every shipped YAML config parses against its script's schema (no unknown keys, right types)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.core.config import parse_config

ROOT = Path(__file__).resolve().parents[1]


def _schemas():
    from distill.generate_pairs import PairsConfig
    from distill.sample import SampleConfig
    from distill.train_gan import GANConfig
    from distill.train_latent_lpips import TrainLatentLPIPSConfig
    from distill.train_student import StudentConfig

    return {
        "pairs": PairsConfig,
        "student": StudentConfig,
        "sample": SampleConfig,
        "latent_lpips": TrainLatentLPIPSConfig,
        "scratch": GANConfig,
    }  # eval: own tests


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses(path):
    schemas = _schemas()
    schema = schemas.get(path.parent.name)
    if path.parent.name == "digits":  # the testbed folder holds one config per stage, named after it
        from distill.evaluate import EvalConfig

        schemas["eval"] = EvalConfig
        schema = next((schemas[k] for k in ("student", "pairs", "eval") if path.stem.startswith(k)), None)
    if schema is None:
        pytest.skip(f"{path.parent.name} configs are checked by their own tests")
    cfg = parse_config(schema, ["--config", str(path)])
    assert isinstance(cfg, schema)


def test_flags_override_yaml_and_types_are_checked(tmp_path):
    from distill.core.config import ConfigError
    from distill.generate_pairs import PairsConfig

    cfg = parse_config(PairsConfig, ["--config", str(ROOT / "configs/pairs/sd15.yaml"), "--guidance_scale", "2.5"])
    assert cfg.guidance_scale == 2.5 and cfg.scheduler == "ddim"
    with pytest.raises(ConfigError, match="num_pairs"):
        parse_config(PairsConfig, ["--num_pairs", "lots"])


def test_negative_numbers_and_dash_text_are_values_and_bare_booleans_are_true():
    from distill.generate_pairs import PairsConfig
    from distill.train_student import StudentConfig

    cfg = parse_config(
        StudentConfig,
        [
            "--learning_rate_g",
            "-1e-4",
            "--holdout",
            "-5",
            "--allow_teacher_mismatch",
            "--gradient_checkpointing",
            "false",
        ],
    )
    assert cfg.learning_rate_g == -1e-4 and cfg.holdout == -5  # parsed; the script's range check names them
    assert cfg.allow_teacher_mismatch is True and cfg.gradient_checkpointing is False
    assert parse_config(PairsConfig, ["--negative_prompt", "-blurry", "--seed", "-3"]).negative_prompt == "-blurry"


@pytest.mark.parametrize(
    "text, message",
    [
        ("teacher: x\nnum_pairs: [1, 2\n", "is not valid YAML at line 3"),
        ("teacher: x\n  bad indent: 1\n", "is not valid YAML at line 2"),
        ("- a list\n- not a mapping\n", "must be a mapping of `key: value` lines"),
    ],
)
def test_malformed_yaml_is_one_line_naming_the_file(tmp_path, text, message):
    from distill.core.config import ConfigError
    from distill.generate_pairs import PairsConfig

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(PairsConfig, ["--config", str(path)])
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_eval_fidelity_rows_are_the_student_configs_holdout():
    """configs/eval score exactly the pairs the matching configs/student held out (the last `holdout` rows)."""
    from omegaconf import OmegaConf

    students = {
        OmegaConf.load(p).pairs: OmegaConf.load(p)
        for p in (ROOT / "configs").glob("*/*.yaml")
        if p.parent.name in ("student", "digits") and "holdout" in OmegaConf.load(p)
    }
    checked = 0
    for path in [*(ROOT / "configs" / "eval").glob("*.yaml"), ROOT / "configs" / "digits" / "eval.yaml"]:
        cfg = OmegaConf.load(path)
        if "fidelity" not in cfg.get("metrics", "fidelity") or cfg.pairs not in students:
            continue
        assert cfg.fidelity_start == -students[cfg.pairs].holdout, path.name
        assert cfg.get("fidelity_count", 0) == 0, path.name
        checked += 1
    assert checked >= 4  # sd15, sd15 teacher, sdxl, digits


# ---- the flags people type: lists, bare booleans, choices in --help, raw usage examples, diffusers' names


def test_list_values_from_the_command_line():
    from distill.train_latent_lpips import TrainLatentLPIPSConfig
    from distill.train_student import StudentConfig

    for given in (["64,128,256"], ["[64, 128, 256]"], ["64", "128", "256"]):
        cfg = parse_config(
            TrainLatentLPIPSConfig, ["--stage_channels", *given, "--pool_after_stage", "true,false,true"]
        )
        assert cfg.stage_channels == [64, 128, 256] and cfg.pool_after_stage == [True, False, True]
    # Strings are never split on commas: a prompt may hold one.
    cfg = parse_config(StudentConfig, ["--validation_prompts", "a cat, sitting", "a dog", "--seed", "3"])
    assert cfg.validation_prompts == ["a cat, sitting", "a dog"] and cfg.seed == 3
    assert parse_config(StudentConfig, ["--validation_prompts", "[a cat, a dog]"]).validation_prompts == [
        "a cat",
        "a dog",
    ]
    from distill.core.config import ConfigError

    with pytest.raises(ConfigError, match="stage_channels"):
        parse_config(TrainLatentLPIPSConfig, ["--stage_channels", "64,wide"])


def test_bare_booleans_before_other_flags_and_at_the_end():
    from distill.train_student import StudentConfig

    cfg = parse_config(StudentConfig, ["--gradient_checkpointing", "--seed", "2", "--allow_teacher_mismatch"])
    assert cfg.gradient_checkpointing is True and cfg.allow_teacher_mismatch is True and cfg.seed == 2


def test_help_shows_choices_and_keeps_the_usage_examples(capsys):
    from distill.train_student import StudentConfig
    from distill.train_student import __doc__ as doc

    with pytest.raises(SystemExit) as info:
        parse_config(StudentConfig, ["--help"], description=doc)
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--student {unet,gigagan,stylegan_t,transformer}" in text and "--mixed_precision {no,fp16,bf16}" in text
    assert "--regression {elatentlpips,mse,none}" in text
    assert (
        "--teacher VALUE, --pretrained_model_name_or_path VALUE" in text
        and "--batch_size VALUE, --train_batch_size VALUE" in text
    )
    usage = next(line for line in doc.splitlines() if "accelerate launch" in line)
    assert usage in text.splitlines()  # the example line is printed as written, not reflowed


@pytest.mark.parametrize("source", ["flag", "file"])
def test_choices_are_checked_in_flags_and_files_in_one_line(tmp_path, source):
    from distill.core.config import ConfigError
    from distill.train_student import StudentConfig

    argv = ["--student", "biggan"]
    if source == "file":
        (tmp_path / "c.yaml").write_text("student: biggan\n")
        argv = ["--config", str(tmp_path / "c.yaml")]
    with pytest.raises(ConfigError) as info:
        parse_config(StudentConfig, argv)
    assert str(info.value) == "unknown student 'biggan'; choose one of unet, gigagan, stylegan_t, transformer"


def test_diffusers_flag_names_are_aliases(tmp_path):
    from distill.core.config import ConfigError
    from distill.train_student import StudentConfig

    cfg = parse_config(
        StudentConfig,
        [
            "--pretrained_model_name_or_path",
            "some/teacher",
            "--train_batch_size",
            "4",
            "--tracker_project_name",
            "exp1",
            "--validation_prompts",
            "a cat",
        ],
    )
    assert (cfg.teacher, cfg.batch_size, cfg.tracker_project_name, cfg.validation_prompts) == (
        "some/teacher",
        4,
        "exp1",
        ["a cat"],
    )
    (tmp_path / "c.yaml").write_text("pretrained_model_name_or_path: other/teacher\n")
    assert parse_config(StudentConfig, ["--config", str(tmp_path / "c.yaml")]).teacher == "other/teacher"
    (tmp_path / "both.yaml").write_text("teacher: a\npretrained_model_name_or_path: b\n")
    with pytest.raises(ConfigError, match="sets both 'teacher' and its alias 'pretrained_model_name_or_path'"):
        parse_config(StudentConfig, ["--config", str(tmp_path / "both.yaml")])
    from distill.train_gan import GANConfig

    cfg = parse_config(
        GANConfig, ["--train_batch_size", "4", "--dataloader_num_workers", "2", "--tracker_project_name", "scratch1"]
    )
    assert (cfg.batch_size, cfg.num_workers, cfg.tracker_project_name) == (4, 2, "scratch1")


@pytest.mark.parametrize(
    "name, distributed, machines",
    [("single_gpu", "NO", 1), ("multi_gpu", "MULTI_GPU", 1), ("multi_node", "MULTI_GPU", 8)],
)
def test_accelerate_configs_load(name, distributed, machines):
    """configs/accelerate: the launch configs docs/training-a-student.md names load with accelerate's own reader."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert cfg.distributed_type.value == distributed and cfg.num_machines == machines
    assert cfg.num_processes % cfg.num_machines == 0


def _command_schemas():
    """Every command's config schema: the dataclasses named *Config in distill/*.py and distill/digits/*.py."""
    import dataclasses
    import importlib

    found = {}
    for path in [*(ROOT / "distill").glob("*.py"), *(ROOT / "distill" / "digits").glob("*.py")]:
        if "@command\ndef main" not in path.read_text():
            continue
        module = importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for name, obj in vars(module).items():
            if name.endswith("Config") and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = obj
    return found


def test_no_float_key_of_any_command_takes_nan_or_inf():
    """nan / inf are refused for every float key, in one line naming it, before a command does anything."""
    import dataclasses

    from distill.core.config import ConfigError

    checked = 0
    for where, schema in _command_schemas().items():
        for field in dataclasses.fields(schema):
            if "float" not in str(field.type):
                continue
            for value in ("nan", "inf", "-inf"):
                with pytest.raises(ConfigError, match=rf"^{field.name} must be a finite number, got {value}:"):
                    parse_config(schema, [f"--{field.name}", value])
            checked += 1
    assert checked >= 40, checked
