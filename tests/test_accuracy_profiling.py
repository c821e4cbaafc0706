"""Specification of accuracy profiling: the executor's runtime scores configurations, exactly
at full residency; Ray runs them in parallel, resumably, surviving a killed worker; under a cap on
expert bytes per worker, only configurations that fit are scored, and the full model still exactly."""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import threading

import pytest
import torch
import torch.nn.functional as F

from swapmoe.core.layout import LayerLayout, ModelLayout
from swapmoe.core.plan import Strategy
from swapmoe.profiler.accuracy import AccuracyProfiler, AccuracyRun, workload_histograms
from swapmoe.profiler.configs import Configuration, sample
from swapmoe.profiler.residency import exact_capacities
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    wanted = [c.key for c in profiler.configurations()]
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


@pytest.mark.slow
def test_the_switch_model_is_scored_by_rouge_2_on_what_the_executor_generates(checkpoint_dirs):
    """At full residency the summaries are the unmodified model's own greedy ones."""
    from transformers import AutoModelForSeq2SeqLM

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
            made = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TARGET, do_sample=False)[0, 1:].tolist()
            out = made[:made.index(EOS_ID)] if EOS_ID in made else made  # transformers' own greedy summary
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


# --- a cap on the expert bytes one worker holds (AccuracyRun.max_resident_bytes) ----------------

def _flat(totals: dict[str, list[float]]) -> list[float]:
    return [x for workload in sorted(totals) for x in totals[workload]]


@pytest.fixture(scope="module")
def cap(scorer):
    """Five experts' bytes of the tiny model's 16: the full model needs on demand, in top-k (2) slots."""
    return 5 * scorer.layout.layers[0].bytes_per_expert


@pytest.fixture(scope="module")
def capped_run(ray_cluster, tiny_model_dir, tmp_path_factory, cap):
    """A capped run on Ray with a store root of its own: (profiler, rows, the driver's log)."""
    run = AccuracyRun(tiny_model_dir, SET, configurations=4, seed=1, workers=2, root=tmp_path_factory.mktemp("capped"),
                      store_root=tmp_path_factory.mktemp("capped-stores"), max_resident_bytes=cap)
    lines = []
    profiler = AccuracyProfiler(run, log=lines.append)
    return profiler, profiler(progress=False), lines


@pytest.mark.slow
def test_a_capped_runs_reference_row_is_the_uncapped_full_models(capped_run, scorer):
    """The planner reads the reference's activations: a cap must not change a count."""
    profiler, rows, lines = capped_run
    reference = next(r for r in rows if r["key"] == profiler.reference_key)
    uncapped = scorer.score(Configuration.from_key(profiler.reference_key))  # an uncapped worker's score (above)
    assert reference["activations"] == uncapped.activations
    assert reference["accuracy"] == pytest.approx(uncapped.accuracy, rel=1e-6, abs=0)
    assert _flat(reference["totals"]) == pytest.approx(_flat(uncapped.totals), rel=1e-6, abs=0)
    assert sum("building the expert store" in line for line in lines) == 1  # by the driver, before the workers


@pytest.mark.slow
def test_a_capped_run_scores_the_seeds_first_configurations_that_fit(capped_run, cap):
    profiler, rows, _ = capped_run
    layout = profiler.layout
    fitting, over = [], 0
    assert layout.precisions  # the store keeps lower precisions: configurations draw them, and fit at their bytes
    for index in itertools.count():  # the seed's sequence, filtered here independently of the profiler
        config = sample([l.num_experts for l in layout.layers], index, seed=1, precisions=layout.precisions)
        if layout.expert_bytes(config.experts_per_layer, config.precision) > cap:
            over += 1
        elif config not in fitting:
            fitting.append(config)
        if len(fitting) == profiler.run.configurations:
            break
    assert over  # the cap left some out
    assert sorted(r["key"] for r in rows) == sorted([profiler.reference_key] + [c.key for c in fitting])
    for row in rows:
        if row["key"] != profiler.reference_key:
            assert layout.expert_bytes(row["experts_per_layer"], row.get("precision", ())) <= cap
    longer = AccuracyProfiler(dataclasses.replace(profiler.run, configurations=8), log=lambda _: None)
    assert longer.configurations()[:5] == profiler.configurations()  # a longer run only adds


@pytest.mark.slow
def test_under_a_cap_the_reference_runs_on_demand_within_it_then_masked_gating_again(tiny_model_dir, scorer, cap):
    capped = Scorer(tiny_model_dir, SET, max_resident_bytes=cap)
    held = []

    def measure(*_):  # after each layer's experts ran: the bytes of every layer's slots
        held.append(sum(t.nbytes for layer in capped.experts.layers for t in layer.experts.inner.parameters()))

    try:
        hooks = [layer.experts.register_forward_hook(measure) for layer in capped.experts.layers]
        full = Configuration(tuple(l.num_experts for l in capped.layout.layers), 0)
        assert _flat(capped.score(full).totals) == pytest.approx(_flat(scorer.score(full).totals), rel=1e-6, abs=0)
        for hook in hooks:
            hook.remove()
        assert held and max(held) <= cap
        assert capped.experts.stats.on_demand_loads > 0  # the misses were loaded, not re-routed
        some = Configuration((2,) * capped.layout.num_layers, 4)
        assert capped.score(some).totals == scorer.score(some).totals
        assert capped.experts.strategy is Strategy.MASKED_GATING
    finally:
        capped.close()


def test_a_cap_below_one_slot_per_layer_is_refused_naming_the_minimum(tiny_model_dir, scorer, tmp_path):
    least = sum(l.bytes_per_expert for l in scorer.layout.layers)
    with pytest.raises(ValueError, match=f"below one expert slot per layer: this model needs at least {least} "):
        AccuracyProfiler(AccuracyRun(tiny_model_dir, SET, root=tmp_path, max_resident_bytes=least - 1))
    AccuracyProfiler(AccuracyRun(tiny_model_dir, SET, root=tmp_path, max_resident_bytes=least))  # enough


def test_the_full_model_under_a_cap_keeps_the_same_share_of_every_layer():
    layout = ModelLayout("x", "X", (LayerLayout(0, "a", 8, 2, 100), LayerLayout(1, "b", 64, 8, 10)), 0)
    assert exact_capacities(layout, 10_000) == (8, 64)  # fits whole: as many slots as experts
    assert exact_capacities(layout, 4 * 100 + 32 * 10) == (4, 32)
    assert exact_capacities(layout, 4 * 100 + 31 * 10) == (3, 31)  # the largest share that fits, rounded down
    assert exact_capacities(layout, 100 + 10) == (1, 1)  # one slot each, whatever the fraction
    with pytest.raises(ValueError, match="at least 110 "):
        exact_capacities(layout, 109)
