"""The Switch summarizer's training recipe: what the model reads and how its parameters learn."""

import torch
from transformers import SwitchTransformersForConditionalGeneration

from swapmoe.models.corpus import SummaryPair, code_as_words
from swapmoe.models.training.train_switch import batch_maker, model_config, parameter_groups, split_validation


def test_code_is_read_as_the_lower_case_words_a_docstring_would_use():
    assert code_as_words("def getFileName(self, file_path):\n    return self._paths[file_path]") == (
        "def get file name ( self , file path ) : return self . paths [ file path ]")


def test_the_relative_position_biases_learn_faster_and_without_weight_decay():
    model = SwitchTransformersForConditionalGeneration(model_config(vocab_size=64))
    rest, biases = parameter_groups(model, bias_lr_scale=100.0)
    named = dict(model.named_parameters())
    assert {id(p) for p in biases["params"]} == {id(p) for n, p in named.items() if "relative_attention_bias" in n}
    assert len(biases["params"]) == 2  # the encoder's and the decoder's (layer 0 holds them for all layers)
    assert biases["lr_scale"] == 100.0 and biases["weight_decay"] == 0.0
    assert len(rest["params"]) + len(biases["params"]) == len(named)  # every parameter trains, once


def test_validation_functions_come_from_whole_modules_kept_out_of_training():
    pairs = [SummaryPair(f"cpython:module{m}.py:f{i}", f"f{i}", "def f(): pass", "Do it.") for m in range(200)
             for i in range(3)]
    train, validation = split_validation(pairs, percent=5)
    assert len(train) + len(validation) == len(pairs) and 0 < len(validation) < len(pairs) // 5
    modules = lambda ps: {p.source.rsplit(":", 1)[0] for p in ps}  # noqa: E731
    assert not modules(train) & modules(validation)


def test_batches_ask_for_names_during_the_warmup_then_mostly_for_summaries():
    sources = [[10 + i, 2] for i in range(50)]
    summaries = [[100 + i, 2] for i in range(50)]
    names = [[200 + i, 2] for i in range(50)]
    batch_for = batch_maker(sources, summaries, names, seed=0, name_share=0.25, name_warmup=3)
    first = batch_for(0)
    assert (first["labels"][:, 0] >= 200).all()  # warm-up: every example asks for the name
    assert (first["labels"][:, 0] - 190 == first["input_ids"][:, 0]).all()  # ... of its own function
    later = torch.cat([batch_for(step)["labels"][:, 0] for step in range(3, 43)])
    assert 0.15 < (later >= 200).float().mean() < 0.35
    assert torch.equal(batch_for(7)["labels"], batch_for(7)["labels"])  # a pure function of the step
