"""The bundled checkpoints: real MoE models trained here, loaded like off-the-shelf ones."""

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from swapmoe.executor.engine import Engine, EngineConfig
from swapmoe.executor.requests import GenerationRequest
from swapmoe.models import evaluate
from swapmoe.models.bundled import LM_DIR, SWITCH_DIR
from swapmoe.models.corpus import DOMAINS, load_eval, name_baseline
from swapmoe.models.domains import classify
from swapmoe.models.summarization import rouge2, summarize

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (LM_DIR / "model.safetensors").exists()
                                 or not (SWITCH_DIR / "model.safetensors").exists(),
                                 reason="bundled checkpoints not trained yet")]


@pytest.fixture(scope="module")
def lm():
    return evaluate.load(LM_DIR)


@pytest.fixture(scope="module")
def switch():
    return evaluate.load(SWITCH_DIR, seq2seq=True)


@pytest.mark.parametrize("directory, auto, cls", [
    (LM_DIR, AutoModelForCausalLM, "MixtralForCausalLM"),
    (SWITCH_DIR, AutoModelForSeq2SeqLM, "SwitchTransformersForConditionalGeneration"),
])
def test_checkpoints_load_with_the_auto_classes_and_generate(directory, auto, cls):
    assert (directory / "model.safetensors").stat().st_size <= 25 * 2**20
    model = auto.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert type(model).__name__ == cls
    ids = tokenizer("def read_file(path):", return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert out.shape[-1] > (0 if model.config.is_encoder_decoder else ids.shape[-1])


def test_the_lm_has_a_real_search_space(lm):
    config = lm[0].config
    assert 6 <= config.num_hidden_layers <= 8 and config.num_local_experts >= 16 and config.num_experts_per_tok == 2


def test_held_out_perplexity_is_far_below_uniform(lm):
    model, tokenizer = lm
    recorder = evaluate.RoutingRecorder(model)
    for domain in DOMAINS:
        texts = [row["text"] for row in load_eval(domain)[:12]]
        perplexity, _ = evaluate.perplexity_and_routing(model, tokenizer, texts, recorder)
        assert perplexity < len(tokenizer) / 20, f"{domain}: perplexity {perplexity:.1f}"


def test_switch_rouge2_is_well_above_the_name_baseline(switch):
    model, tokenizer = switch
    pairs = load_eval("summarization")  # all 262 held-out pairs, as in the model card
    references = [p["summary"] for p in pairs]
    ours = rouge2(summarize(model, tokenizer, [p["body"] for p in pairs]), references)
    baseline = rouge2([name_baseline(p["name"]) for p in pairs], references)
    assert ours >= 2 * baseline and ours - baseline >= 0.04, (ours, baseline)


@pytest.fixture(scope="module")
def bundled_engine():
    with Engine(EngineConfig(LM_DIR, budget_bytes=1 << 30, node_id="bundled")) as engine:
        yield engine


@pytest.mark.parametrize("domain", DOMAINS)
def test_generated_text_reads_like_the_domain_of_its_prompt(bundled_engine, domain):
    """Continue held-out excerpts through the executor; the continuation is classified by a
    character-trigram model of the held-out data, independent of the LM."""
    rows = load_eval(domain)[:4]
    agree = 0
    for row in rows:
        prompt = row["text"][:300]
        chunks = bundled_engine.generate(GenerationRequest(bundled_engine.tokenize(prompt), max_new_tokens=48))
        continuation = "".join(c.text for c in chunks)
        agree += classify(continuation) == domain
    assert agree >= 3, f"only {agree} of {len(rows)} continuations read like {domain}"
