"""llama.cpp as a benchmark peer (benchmarks.peer_llamacpp): it computes what transformers computes,
and its memory is its own and capped when asked. Skipped, with the note that says what to install,
where llama-cpp-python or the converter is absent."""

from __future__ import annotations

import pytest

from benchmarks import cgroup_cap, peer_llamacpp as peer
from swapmoe.models.bundled import LM_DIR

NOTE = peer.available()
needs_llama_cpp = pytest.mark.skipif(bool(NOTE), reason=NOTE)


@pytest.fixture(scope="module")
def bundled_gguf(tmp_path_factory):
    if NOTE:
        pytest.skip(NOTE)
    return peer.gguf_for(LM_DIR, "f32", tmp_path_factory.mktemp("gguf"))


def transformers_greedy(prompt: list[int], new_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(LM_DIR, dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(new_tokens):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def a_prompt() -> list[int]:
    from transformers import AutoTokenizer

    from swapmoe.models.corpus import DOMAINS, load_eval

    text = load_eval(DOMAINS[0])[0]["text"][:400]
    return AutoTokenizer.from_pretrained(LM_DIR)(text, add_special_tokens=False)["input_ids"][:32]


@needs_llama_cpp
def test_llama_cpp_f32_greedy_tokens_are_transformers_greedy_tokens_on_the_bundled_lm(bundled_gguf):
    prompt = a_prompt()
    result = peer.decode(bundled_gguf, prompt, 16, threads=1)
    assert result["tokens"] == 16 and not result["capped"]
    assert result["token_ids"] == transformers_greedy(prompt, 16)
    assert result["decode_tokens_per_second"] > 0 and result["peak_rss"] > result["library_rss"] > 0


@needs_llama_cpp
def test_a_process_serves_prompts_in_turn_with_the_same_tokens_as_a_fresh_one(bundled_gguf):
    prompt = a_prompt()
    process = peer.LlamaProcess(bundled_gguf, threads=1)
    try:
        first, other, again = (process.generate(p, 8) for p in (prompt, prompt[:10], prompt))
    finally:
        assert process.close() == 0
    assert first.token_ids == again.token_ids == peer.decode(bundled_gguf, prompt, 8, threads=1)["token_ids"]
    assert len(other.token_ids) == 8 and len(first.times_ns) == 9


@needs_llama_cpp
def test_a_capped_decode_runs_in_its_own_memory_cgroup_which_is_removed_afterwards(bundled_gguf):
    cap = 256 * 2**20
    result = peer.decode(bundled_gguf, a_prompt(), 8, threads=1, cap_bytes=cap, sample=True, seed=3)
    if not result["capped"]:  # never silently uncapped: the result says why
        assert result["cap_note"].startswith("not capped")
        pytest.skip(result["cap_note"])
    assert result["tokens"] == 8 and 0 < result["cgroup_peak"] <= cap
    own = next(line.split(":", 2)[2] for line in open("/proc/self/cgroup").read().splitlines()
               if line.split(":", 2)[1] == "memory")
    assert not list((cgroup_cap.MEMORY_CGROUPS / own.lstrip("/")).glob("swapmoe-bench-*"))


@needs_llama_cpp
def test_a_decode_killed_by_its_cap_is_a_result_with_an_error_not_an_exception(bundled_gguf):
    result = peer.decode(bundled_gguf, a_prompt(), 8, threads=1, cap_bytes=4 * 2**20)
    if not result["capped"]:
        pytest.skip(result["cap_note"])
    assert result["tokens"] == 0 and "status -9" in result["error"]


@needs_llama_cpp
def test_a_cap_that_cannot_be_applied_is_reported_never_silently_dropped(bundled_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(cgroup_cap, "MEMORY_CGROUPS", tmp_path / "no-such-hierarchy")
    result = peer.decode(bundled_gguf, a_prompt(), 4, threads=1, cap_bytes=256 * 2**20)
    assert not result["capped"] and result["cap_note"].startswith("not capped: no memory cgroup")
    assert result["tokens"] == 4 and "cgroup_peak" not in result


def test_an_unknown_outtype_is_refused_with_the_choices(tmp_path):
    with pytest.raises(ValueError, match="q4_k_m"):
        peer.convert(LM_DIR, tmp_path / "x.gguf", "q2_k")


def test_without_the_converter_the_note_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv(peer.SOURCE_ENV, str(tmp_path))
    note = peer.available()
    assert note.startswith("llama.cpp peer skipped") and ("--fetch-converter" in note or "pip install" in note)
