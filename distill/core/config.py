"""Entry-script configuration: dataclass defaults <- optional YAML file <- ``--key value`` flags.

Only the scripts in ``distill/`` call this (and ``distill/distillation/card.py``, which records their resolved
config); library code takes explicit keyword arguments and raises ``ValueError``, which
:func:`run_cli` reports in one line as it does :class:`ConfigError` (a ``ValueError``).
OmegaConf's structured configs do the merging, type coercion and unknown-key rejection; this
module only turns their exceptions into one-line messages and builds the ``--key`` flags so that
``--help`` lists every key with its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config file, key or value; the message names the problem and the fix."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"error: {message} (see --help for the valid keys)\n")


def parse_config(schema: type[T], argv: list[str] | None = None, description: str = "") -> T:
    """Build ``schema`` (a dataclass) from defaults, ``--config FILE.yaml`` and ``--key value`` flags.

    Unknown keys, in the file or on the command line, are an error naming the key. Field metadata:
    ``help``; ``choices`` (shown in ``--help``, checked for file and flag values alike; ``hints``: value -> the
    fix, appended to the error for a value that is not a choice); ``aliases``
    (more flag names, e.g. diffusers' ``--pretrained_model_name_or_path``). Boolean keys may be given
    bare (``--gradient_checkpointing``); list keys take ``--key 1,2,3``, ``--key [1,2,3]`` or ``--key 1 2 3``
    (a list of strings splits on spaces only: ``--validation_prompts "a cat, sitting" "a dog"``).
    """
    fields = {f.name: f for f in dataclasses.fields(schema)}
    # allow_abbrev=False: a typo such as --guidance must not silently set --guidance_scale.
    # RawDescriptionHelpFormatter: the usage examples in the scripts' docstrings keep their lines.
    parser = _Parser(description=description, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file with any of the keys below")
    defaults = schema()
    for name, field in fields.items():
        help_text = field.metadata.get("help", "")
        choices = field.metadata.get("choices")
        kind = _kind(field)
        parser.add_argument(
            f"--{name}",
            *(f"--{alias.lstrip('-')}" for alias in field.metadata.get("aliases", ())),
            dest=name,
            default=argparse.SUPPRESS,
            metavar="{" + ",".join(map(str, choices)) + "}" if choices else ("VALUE" if kind != "list" else "VALUES"),
            # A bare boolean flag (`--allow_teacher_mismatch`) means true; `--flag false` still works.
            nargs="?" if kind == "bool" else ("+" if kind == "list" else None),
            const="true" if kind == "bool" else None,
            help=f"{help_text} (default: {getattr(defaults, name)!r})",
        )
    args = parser.parse_args(_join_negative_values(sys.argv[1:] if argv is None else list(argv), fields))
    base = OmegaConf.structured(schema)
    layers = [base]
    if args.config is not None:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found: pass an existing YAML file to --config")
        loaded = _canonical_keys(_load_yaml(path), fields, path)
        unknown = sorted(set(loaded.keys()) - set(fields))  # type: ignore[arg-type]
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {', '.join(map(repr, unknown))} in {path}; valid keys: {', '.join(fields)}"
            )
        layers.append(loaded)
    overrides = {k: _flag_value(v, fields[k]) for k, v in vars(args).items() if k != "config"}
    if overrides:
        # Raw strings, not YAML: '--pairs ""' stays an empty string and '--x -3:' stays text; OmegaConf
        # converts them to the field's int / float / bool type (or names the key when it cannot).
        layers.append(OmegaConf.create(overrides))
    try:
        merged = OmegaConf.merge(*layers)
        config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"bad value for config key {key!r}: {msg}") from None
    for name, field in fields.items():
        choices, value = field.metadata.get("choices"), getattr(config, name)
        if choices and value is not None and value not in choices:
            hint = field.metadata.get("hints", {}).get(value)  # a value that belongs to another command, say
            raise ConfigError(
                f"unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}{'; ' + hint if hint else ''}"
            )
    require_finite(config)
    return config  # type: ignore[return-value]


def require_finite(config: Any) -> None:
    """One-line error for the first float key (or float in a list key) that is nan or +-inf: no key of any command
    means anything by them, and diffusers or torch would take some silently (a NaN guidance scale turns CFG off)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(
                    f"{field.name} must be a finite number, got {item}: pass a real value (see --help for its meaning)"
                )


def _canonical_keys(loaded, fields: dict, path: Path):
    """A file may use a key's aliases too (older names, diffusers' names); they become the key itself."""
    aliases = {alias.lstrip("-"): name for name, f in fields.items() for alias in f.metadata.get("aliases", ())}
    if not set(loaded.keys()) & set(aliases):
        return loaded
    data = OmegaConf.to_container(loaded)
    for alias, name in aliases.items():
        if alias in data:
            if name in data:
                raise ConfigError(f"config file {path} sets both {name!r} and its alias {alias!r}: keep one")
            data[name] = data.pop(alias)
    return OmegaConf.create(data)


def _kind(field: dataclasses.Field) -> str:
    """``bool``, ``list`` or ``scalar``, from the (possibly string) annotation."""
    text = str(field.type).replace("typing.", "")
    if text in ("bool", "<class 'bool'>"):
        return "bool"
    return "list" if text.lower().startswith(("list[", "optional[list[")) or text.startswith("List[") else "scalar"


def _list_element(field: dataclasses.Field) -> str:
    text = str(field.type)
    return text[text.rindex("[") + 1 : text.index("]")].strip().replace("typing.", "")


def _join_negative_values(argv: list[str], fields: dict) -> list[str]:
    """``--key -1e-4`` -> ``--key=-1e-4``: argparse takes only ``-5`` / ``-.5`` as values, not ``-1e-4`` or ``-x``."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if (
            token.startswith("--")
            and "=" not in token
            and token[2:] in (*fields, "config")
            and nxt is not None
            and nxt.startswith("-")
            and not nxt.startswith("--")
            and nxt not in ("-h",)
        ):
            out.append(f"{token}={nxt}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def _load_yaml(path: Path):
    """The YAML mapping in ``path``; a syntax error or a non-mapping file is one line naming the file and line."""
    import yaml

    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"config file {path} is not valid YAML{where} ({problem}): fix the file (key: value per line)"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}): "
            "re-save it as UTF-8"
        ) from None
    if not OmegaConf.is_dict(loaded):
        raise ConfigError(f"config file {path} must be a mapping of `key: value` lines, not a {type(loaded).__name__}")
    return loaded


def _flag_value(raw, field: dataclasses.Field):
    if isinstance(raw, list):  # a list key: tokens, each a value, `a,b,c` (not for strings) or `[a, b, c]`
        items: list = []
        for token in raw:
            if token.strip().startswith("["):
                import yaml

                try:
                    parsed = yaml.safe_load(token)
                except yaml.YAMLError:
                    raise ConfigError(
                        f"bad value for config key {field.name!r}: {token!r} is not a list (write [1, 2, 3] or 1,2,3)"
                    ) from None
                items += parsed if isinstance(parsed, list) else [parsed]
            elif _list_element(field) != "str":
                items += [t.strip() for t in token.split(",") if t.strip()]
            else:
                items.append(token)
        return items
    optional = "Optional" in str(field.type) or "None" in str(field.type)
    if optional and raw.strip().lower() in ("null", "none", "~"):
        return None
    return raw


def with_default(
    schema: type,
    name: str,
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    **metadata: Any,
) -> Any:
    """The key ``name`` of a base schema, redeclared in a command's schema with its own default; ``metadata``
    (``help``, ``aliases``) replaces the base's entries, the rest (e.g. ``choices``) stays. A redeclared key keeps
    the base's place in ``--help``."""
    base = {f.name: f for f in dataclasses.fields(schema)}[name]
    return dataclasses.field(default=default, default_factory=default_factory, metadata={**base.metadata, **metadata})


def require_positive(config: Any, *keys: str) -> None:
    """One-line error for the first of ``keys`` that is not > 0 (an unset optional key, None, passes)."""
    for key in keys:
        if getattr(config, key) is not None and getattr(config, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(config, key)}")


def require_positive_or_null(config: Any, *keys: str) -> None:
    """One-line error for the first of ``keys`` that is set but not >= 1 (null means no limit, e.g.
    ``checkpoints_total_limit``: keep all)."""
    for key in keys:
        value = getattr(config, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be at least 1 (or null: keep all), got {value}")


def require_non_negative(config: Any, *keys: str) -> None:
    """One-line error for the first of ``keys`` that is < 0 (an unset optional key, None, passes)."""
    for key in keys:
        if getattr(config, key) is not None and getattr(config, key) < 0:
            raise ConfigError(f"{key} must not be negative, got {getattr(config, key)}")


def require_between(config: Any, key: str, low: float, high: float, *, high_inclusive: bool = True) -> None:
    """One-line error unless ``low <= config.key <= high`` (``< high`` when not ``high_inclusive``)."""
    value = getattr(config, key)
    if not (low <= value and (value <= high if high_inclusive else value < high)):
        raise ConfigError(f"{key} must be in [{low}, {high}{']' if high_inclusive else ')'}, got {value}")


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions of ``names`` (``unknown`` when absent), recorded in manifests and metrics."""
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (the run directory's record of what ran), secrets left out; written to a
    temporary name and renamed, so that a full disk leaves the previous record (or none), never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(config_dict(config))))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def config_dict(config: Any) -> dict:
    """The resolved config as a dict; ``*_token`` values (Hub credentials) are replaced by None, so that no run
    folder, model card or tracker ever holds one."""
    data = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    return {k: (None if k.endswith("_token") else v) for k, v in data.items()}  # type: ignore[union-attr]


def run_cli(main: Callable[[], Any]) -> None:
    """Run an entry point; user errors (bad config, missing files, bad inputs) end in one line (exit 2),
    Ctrl-C in one line (exit 130; what was saved stays, partial files are removed on the way out).

    Set ``D2G_DEBUG=1`` to see the traceback instead.
    """
    from distill.core.quiet import quiet_libraries

    quiet_libraries()
    try:
        main()
    except KeyboardInterrupt:
        if os.environ.get("D2G_DEBUG"):
            traceback.print_exc()
        sys.stderr.write(
            "interrupted (Ctrl-C): finished shards, samples and checkpoints are kept; re-run the same command to "
            "resume\n"
        )
        sys.exit(130)
    except (ValueError, OSError) as exc:
        if os.environ.get("D2G_DEBUG"):
            traceback.print_exc()
            sys.exit(1)
        sys.stderr.write(f"error: {exc}\n")
        _tell_the_launcher(f"error: {exc}")
        sys.exit(2)


def _tell_the_launcher(line: str) -> None:
    """Under torchrun (``accelerate launch`` of several processes) the summary printed last names each failed process's
    error file as its root cause, else a link to a traceback: write the user's line there, so the summary ends with
    it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        import json
        import time

        try:
            Path(path).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
        except OSError:
            pass  # the line is on stderr already


def command(main: Callable[[], Any]) -> Callable[[], None]:
    """Mark an entry script's ``main``: called by ``python distill/X.py``, ``accelerate launch distill/X.py`` and the
    console script of ``[project.scripts]`` alike, it ends user errors in one line (:func:`run_cli`)."""

    @functools.wraps(main)
    def entry_point() -> None:
        run_cli(main)

    return entry_point
