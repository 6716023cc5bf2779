"""Prompt sources: text / JSONL / JSON / CSV / Parquet files, or a ``datasets`` dataset by name.

The prompt of row ``index`` is ``prompts[index % len(prompts)]``, so ``num_pairs`` may exceed the
number of prompts (each prompt is then used with several noises).
"""

from __future__ import annotations

from pathlib import Path

_FILE_TYPES = {".txt": None, ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".tsv": "csv"}


def _read_utf8(path: Path) -> str:
    """The file's text; a file that is not UTF-8 is one line naming it and the first bad byte's offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"prompt file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
            "re-save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _as_text(value) -> str:
    # COCO-style datasets keep several captions per image: use the first.
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    if isinstance(value, dict):  # e.g. {"raw": "..."} caption structs
        value = value.get("raw") or value.get("text") or next(iter(value.values()), "")
    return "" if value is None else str(value)


def load_prompts(source: str, *, column: str = "prompt", split: str = "train") -> list[str]:
    """Read prompts from ``source``; blank prompts are skipped.

    source: a ``.txt`` file (one prompt per line), a ``.jsonl/.json/.csv/.tsv/.parquet`` file with a
    ``column``, or a ``datasets`` name / folder (``split`` and ``column`` select the captions).
    """
    if not source:
        raise ValueError("no prompt source given: set `prompts` to a .txt/.jsonl/.csv/.parquet file or a datasets name")
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in _FILE_TYPES or (path.exists() and path.is_file()):
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {source} not found: pass an existing file to `prompts`")
        if suffix == ".txt" or suffix not in _FILE_TYPES:
            raw = _read_utf8(path).splitlines()
        else:
            import datasets

            if suffix != ".parquet":
                _read_utf8(path)  # datasets would fail deep inside its CSV / JSON readers

            kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
            ds = datasets.load_dataset(_FILE_TYPES[suffix], data_files=str(path), split="train", **kwargs)
            raw = _column(ds, column, source)
    else:
        import datasets

        try:
            if path.is_dir() and (path / "dataset_info.json").exists():
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[split]
            else:
                ds = datasets.load_dataset(source, split=split)
        except Exception as exc:  # datasets raises many types; the user needs one line
            raise FileNotFoundError(
                f"prompt source {source!r} is neither a file nor a loadable datasets dataset ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); pass a prompt file or a dataset available offline"
            ) from None
        raw = _column(ds, column, source)
    prompts = [p.strip() for p in map(_as_text, raw)]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(
            f"prompt source {source} contains no prompts: add one prompt per line (or rows with a `{column}` column)"
        )
    return prompts


def _column(ds, column: str, source: str):
    if column not in ds.column_names:
        raise ValueError(
            f"prompt source {source} has no column {column!r} (columns: {', '.join(ds.column_names)}); set "
            "`prompt_column`"
        )
    return ds[column]


def prompt_for_index(prompts: list[str], index: int) -> str:
    return prompts[index % len(prompts)]


def prompts_fingerprint(prompts: list[str]) -> str:
    """A short hash of the prompt list, recorded in manifests so a changed prompt file is noticed."""
    import hashlib

    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8") + b"\n")
    return h.hexdigest()[:16]


__all__ = ["load_prompts", "prompt_for_index", "prompts_fingerprint"]


def load_labelled_prompts(
    source: str, *, column: str = "prompt", label_column: str = "label"
) -> tuple[list[str], list[int]]:
    """Prompts and their integer class labels from a ``.jsonl/.json/.csv/.tsv/.parquet`` table.

    Rows with a blank prompt are skipped exactly as :func:`load_prompts` skips them, so position ``i``
    of both lists describes the prompt used for sample ``i`` (modulo the number of prompts).
    """
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in _FILE_TYPES or suffix == ".txt":
        raise ValueError(
            f"labelled prompts need a table file (.jsonl/.csv/.parquet) with `{column}` and `{label_column}` "
            f"columns, got {source!r}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {source} not found: pass an existing file to `prompts`")
    import datasets

    if suffix != ".parquet":
        _read_utf8(path)
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    ds = datasets.load_dataset(_FILE_TYPES[suffix], data_files=str(path), split="train", **kwargs)
    prompts, labels = [], []
    for text, label in zip(_column(ds, column, source), _column(ds, label_column, source)):
        text = _as_text(text).strip()
        if text:
            prompts.append(text)
            labels.append(int(label))
    if not prompts:
        raise ValueError(f"prompt source {source} contains no prompts")
    return prompts, labels
