"""A T5 tokenizer without the model hub, for SD3 teachers built offline (tests, the digits testbed).

SD3's third text encoder is T5, whose tokenizer is a SentencePiece Unigram model. The real 32k
vocabulary cannot be fetched offline, so this builds transformers' own ``T5Tokenizer`` (the
``tokenizers``-backed Unigram class that ``StableDiffusion3Pipeline`` loads as ``tokenizer_3``) over a
character-level vocabulary: T5's special tokens at T5's ids (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), the
word-start marker ``▁`` and printable ASCII. Any text tokenizes (one token per character), it saves and
reloads with ``from_pretrained`` like the hub one; only the vocabulary differs from T5's.
"""

from __future__ import annotations

import string
import tempfile

from transformers import T5Tokenizer


def t5_vocabulary() -> list[tuple[str, float]]:
    """``(piece, log-probability)`` pairs: specials, ``▁`` and ``▁``-prefixed / bare printable characters."""
    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    # A word-initial character as one piece is likelier than "▁" + character, as in real T5 vocabularies.
    vocab += [("▁" + c, -4.0) for c in chars] + [(c, -5.0) for c in chars]
    return vocab


def build_t5_tokenizer(model_max_length: int = 512) -> T5Tokenizer:
    """A working ``T5Tokenizer`` (character-level Unigram, no sentinel tokens), round-tripped through
    ``save_pretrained`` / ``from_pretrained`` as a user's folder would be."""
    tok = T5Tokenizer(vocab=t5_vocabulary(), extra_ids=0, model_max_length=model_max_length)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        tok = T5Tokenizer.from_pretrained(tmp)
    ids = tok("a cat").input_ids
    if ids[-1] != tok.eos_token_id or tok.unk_token_id in ids:
        raise RuntimeError(f"built a broken T5 tokenizer: 'a cat' -> {ids}")
    return tok
