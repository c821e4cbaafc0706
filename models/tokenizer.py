"""A byte-level BPE tokenizer trained with ``tokenizers`` on the training documents of every domain."""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from swapmoe.models.corpus import DOMAINS, split

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def train_tokenizer(vocab_size: int = 4096, sample_chars: int = 3_000_000, seed: int = 0) -> PreTrainedTokenizerFast:
    """BPE over an equal sample of each domain, so no domain's vocabulary crowds out another's."""
    rng = random.Random(seed)
    texts = []
    for domain in DOMAINS:
        docs = split(domain)[0]
        rng.shuffle(docs)
        budget = sample_chars
        for doc in docs:
            texts.append(doc.text[:budget])
            budget -= len(texts[-1])
            if budget <= 0:
                break
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=True,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=512)
