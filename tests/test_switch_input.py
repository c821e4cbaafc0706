"""The bundled summarizer prepares its own input: raw Python source works through any loader, and
a client prints a seq2seq answer on its own (issue 12, found by trying the models as a new user)."""

from __future__ import annotations

import io
import json

import pytest
from transformers import AutoTokenizer

from swapmoe.executor.engine import Engine, EngineConfig
from swapmoe.executor.requests import GenerationRequest
from swapmoe.executor.server import serve
from swapmoe.models.bundled import SWITCH_DIR
from swapmoe.models.corpus import code_as_words
from swapmoe.models.summarization import without_normalizer
from swapmoe.cli.client import stream_generation

SOURCE = "def readFileName(self, path_name):\n    return open(path_name).read().strip()"


@pytest.fixture(scope="module")
def switch():
    with Engine(EngineConfig(SWITCH_DIR, budget_bytes=1 << 30, node_id="switch")) as engine:
        yield engine


def test_raw_source_tokenizes_as_the_model_was_trained_on_every_held_out_function():
    tokenizer = AutoTokenizer.from_pretrained(SWITCH_DIR)
    trained_on = without_normalizer(tokenizer)  # the tokenizer without its normalizer, fed code_as_words by hand
    bodies = [json.loads(line)["body"] for line in (SWITCH_DIR.parent / "data/eval/summarization.jsonl").open()]
    for body in bodies:
        assert tokenizer(body, add_special_tokens=False)["input_ids"] == \
            trained_on.encode(code_as_words(body), add_special_tokens=False).ids
    assert len(bodies) == 262


def test_the_executor_summarizes_raw_source_as_it_does_prepared_source(switch):
    def summary(text: str) -> list[int]:
        return [t for c in switch.generate(GenerationRequest(switch.tokenize(text), 12)) for t in c.token_ids]

    assert summary(SOURCE) == summary(code_as_words(SOURCE))


def test_a_client_prints_a_seq2seq_answer_alone_and_continues_a_causal_prompt(switch, tiny_engine):
    for served, continues in ((switch, False), (tiny_engine, True)):
        server = serve(served)
        try:
            out = io.StringIO()
            stream_generation(f"127.0.0.1:{server.port}", SOURCE, out=out, max_new_tokens=6)
            assert out.getvalue().startswith(SOURCE) == continues
        finally:
            server.stop(grace=1)
