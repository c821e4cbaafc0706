"""Specification of accuracy profiling: the executor's runtime scores configurations, exactly
at full residency; Ray runs them in parallel, resumably, surviving a killed worker."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch
import torch.nn.functional as F

from swapmoe.profiler.accuracy import AccuracyProfiler, AccuracyRun, workload_histograms
from swapmoe.profiler.configs import Configuration
from swapmoe.profiler.scoring import Scorer, mix_perplexity
from swapmoe.profiler.workloads import DOMAINS, MIX, ProfilingSet

SET = ProfilingSet("lm", texts=1, tokens=40)


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    s = Scorer(tiny_model_dir, SET)
    yield s
    s.close()


def _reference_perplexity(model_dir, tokenizer, texts: list[str]) -> float:
    """Perplexity of the unmodified transformers model over the same tokens, one window each."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:SET.tokens]])
            logits = model(input_ids=ids).logits[0, :-1]
            nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return nll, count


def test_with_every_expert_resident_the_score_is_the_unmodified_models(scorer, tiny_model_dir):
    full = Configuration(tuple(l.num_experts for l in scorer.layout.layers), 0)
    score = scorer.score(full)
    for domain, texts in SET.texts_by_domain().items():
        nll, count = _reference_perplexity(tiny_model_dir, scorer.tokenizer, texts)
        assert score.totals[domain][1] == count
        assert score.totals[domain][0] == pytest.approx(nll, rel=1e-5)
    assert score.accuracy[MIX] == pytest.approx(mix_perplexity(score.totals))
    assert set(score.accuracy) == set(DOMAINS) | {MIX}


def test_scores_depend_on_the_configuration_alone(scorer):
    config = Configuration((2,) * scorer.layout.num_layers, 2)
    first = scorer.score(config)
    scorer.score(Configuration((1,) * scorer.layout.num_layers, 4))  # leaves other experts resident
    assert scorer.score(config).totals == first.totals


def test_fewer_resident_experts_change_the_score(scorer):
    full = scorer.score(Configuration(tuple(l.num_experts for l in scorer.layout.layers), 0))
    one = scorer.score(Configuration((1,) * scorer.layout.num_layers, 4))
    assert one.accuracy[MIX] != pytest.approx(full.accuracy[MIX], rel=1e-4)


def test_a_profiling_set_that_does_not_fit_the_model_is_refused(tiny_model_dir):
    def loaders():
        return [t for t in threading.enumerate() if t.name.startswith("expert-loader")]

    before = loaders()
    with pytest.raises(ValueError, match="decoder-only"):
        Scorer(tiny_model_dir, ProfilingSet("summarization", pairs=2))
    assert loaders() == before  # no loader thread left behind


def test_ray_profiling_resumes_and_survives_a_killed_worker(ray_cluster, tiny_model_dir, tmp_path, scorer):
    run = AccuracyRun(tiny_model_dir, SET, configurations=6, seed=1, workers=2, root=tmp_path)
    profiler = AccuracyProfiler(run, log=lambda _: None)
    killed = []

    def kill_one(row):
        if not killed:  # mid-run: one worker process dies with its configurations in flight
            pid = ray_cluster.get(profiler.workers[0].pid.remote())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    rows = profiler(progress=False, on_result=kill_one)
    assert killed
    wanted = [c.key for c in profiler.configurations([l.num_experts for l in scorer.layout.layers])]
    assert sorted(r["key"] for r in rows) == sorted(wanted)  # none lost, none twice
    for row in rows:  # the same scores as one process gets: deterministic for a seed
        assert row["totals"] == scorer.score(Configuration.from_key(row["key"])).totals
    assert set(workload_histograms(rows)) == set(DOMAINS) | {MIX}

    finished = {r["key"]: r["finished"] for r in rows}
    again = AccuracyProfiler(AccuracyRun(tiny_model_dir, SET, configurations=8, seed=1, workers=2, root=tmp_path),
                             log=lambda _: None)(progress=False)
    assert {r["key"]: r["finished"] for r in again if r["key"] in finished} == finished  # not rescored
    assert len(again) == len(wanted) + 2
    assert len({r["key"] for r in again}) == len(again)


def test_the_switch_model_is_scored_by_rouge_2_on_what_the_executor_generates(checkpoint_dirs):
    """At full residency the summaries are the unmodified model's own greedy ones."""
    from transformers import AutoModelForSeq2SeqLM

    from swapmoe.executor.generation import SamplingParams, generate_ids
    from swapmoe.models.summarization import MAX_TARGET, rouge2_scores
    from swapmoe.models.tokenizer import EOS_ID

    model_dir = checkpoint_dirs("switch_transformers")
    pairs = ProfilingSet("summarization", pairs=2)
    scorer = Scorer(model_dir, pairs)
    try:
        full = Configuration(tuple(l.num_experts for l in scorer.layout.layers), 0)
        score = scorer.score(full)
        model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, local_files_only=True).eval()
        predictions, generated = [], []
        for ids in scorer.inputs["summarization"]:
            out = []
            for token in generate_ids(model, tuple(ids), MAX_TARGET, SamplingParams()):
                if token == EOS_ID:
                    break
                out.append(token)
            generated.append(out)
            predictions.append(scorer.tokenizer.decode(out, skip_special_tokens=True).strip())
        assert scorer.generated == generated and any(generated)
        expected = rouge2_scores(predictions, [p["summary"] for p in pairs.summary_pairs()])
        assert score.totals["summarization"] == [pytest.approx(float(expected.sum())), 2]
        assert score.accuracy["summarization"] == pytest.approx(float(expected.mean()))
        one = scorer.score(Configuration((1,) * scorer.layout.num_layers, 2))
        assert set(one.accuracy) == {"summarization"}
    finally:
        scorer.close()
