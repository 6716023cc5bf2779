"""A real CLIP BPE tokenizer without the model hub.

``open_clip_torch`` ships OpenAI's CLIP byte-pair vocabulary (``bpe_simple_vocab_16e6.txt.gz``); the
Hugging Face ``CLIPTokenizer`` for ``openai/clip-vit-*`` is the same 49,408-token vocabulary stored as
``vocab.json`` + ``merges.txt``. Rebuilding those two files from the open_clip resource gives a
tokenizer identical to the hub one, which tests and the digits testbed use offline. Hand-written
because neither library converts one format into the other.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

CLIP_VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP reversible byte -> printable-unicode table (the BPE alphabet).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _open_clip_merges() -> list[str]:
    path = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
    with path.open("rb") as fh:
        lines = gzip.decompress(fh.read()).decode("utf-8").split("\n")
    # CLIP keeps the first 49152 - 256 - 2 merges (see the CLIP paper's tokenizer).
    return lines[1 : 49152 - 256 - 2 + 1]


def write_clip_tokenizer_files(save_dir: str | os.PathLike) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the CLIP tokenizer into ``save_dir``."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    merges = _open_clip_merges()
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split(" ")) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (save_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (save_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return save_dir


def build_clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The CLIP tokenizer (49,408 tokens) built offline from open_clip's bundled vocabulary.

    ``pad_token`` is ``<|endoftext|>`` as in SD1.x; SD2.x / SDXL's second tokenizer pad with ``!``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        # Round-trip through the saved files: the same path a user's ``from_pretrained(dir)`` takes.
        write_clip_tokenizer_files(tmp)
        tok = CLIPTokenizer.from_pretrained(tmp, model_max_length=model_max_length, pad_token=pad_token)
    if len(tok) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"built a CLIP tokenizer with {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}")
    return tok
