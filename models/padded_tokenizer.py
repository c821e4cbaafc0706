"""A bundled byte-level BPE tokenizer, fitted to another model's vocabulary size.

The paper-scale checkpoints (``models.paper_scale``) need a tokenizer under which every id the
model can produce decodes, and whose special tokens sit at the published model's ids. Padding
the bundled tokenizer with ``<unused_N>`` tokens (or cutting it) to the vocab size and moving
its special tokens does both, and real text still encodes to real ids.
"""

from __future__ import annotations

import json
from pathlib import Path

BYTE_LEVEL_MINIMUM = 259  # pad/bos/eos and the 256 byte tokens: byte-level BPE encodes any text


def token_list(source: Path, vocab_size: int, specials: dict[str, int]) -> list[str]:
    """The tokens in id order: ``source``'s vocabulary cut or padded to ``vocab_size``, each
    token of ``specials`` swapped to its id where that id exists."""
    vocab = json.loads((source / "tokenizer.json").read_text())["model"]["vocab"]
    if vocab_size < BYTE_LEVEL_MINIMUM:
        raise ValueError(f"vocab_size {vocab_size} is too small: the byte-level tokenizer needs "
                         f"{BYTE_LEVEL_MINIMUM} ids")
    tokens = sorted(vocab, key=vocab.get)
    tokens = tokens[:vocab_size] + [f"<unused_{i}>" for i in range(len(tokens), vocab_size)]
    if len(set(tokens)) != vocab_size:
        raise ValueError(f"a filler token collides with a token of {source}'s vocabulary")
    for token, target in specials.items():
        if target < vocab_size:
            i = tokens.index(token)
            tokens[i], tokens[target] = tokens[target], tokens[i]
    return tokens


def padded_tokenizer(source: Path, vocab_size: int, specials: dict[str, int], model_max_length: int):
    """``source``'s tokenizer with exactly ``token_list``'s vocabulary (merges and added tokens
    that fall outside it dropped)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads((source / "tokenizer.json").read_text())
    vocab = {token: i for i, token in enumerate(token_list(source, vocab_size, specials))}
    merges = [m if isinstance(m, list) else m.split(" ", 1) for m in data["model"]["merges"]]
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    data["added_tokens"] = sorted((dict(t, id=vocab[t["content"]]) for t in data["added_tokens"]
                                   if t["content"] in vocab), key=lambda t: t["id"])
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>", model_max_length=model_max_length)
