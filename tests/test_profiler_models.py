"""Specification of the profiler's pure parts: configuration sampling, the profiling/judging
split, E_memory against a real executor's accounting, E_accuracy and E_latency, and stored
profiles."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest

from swapmoe.core.budget import MemoryModel
from swapmoe.core.device_profile import (BatchDecodePoint, ComputeSample, DeviceProfile, LayerProfile, LoadSample,
                                         PrecisionPoint, SweepPoint)
from swapmoe.core.layout import DeviceInfo, LayerLayout, ModelLayout
from swapmoe.core.plan import Plan
from swapmoe.profiler import artifacts
from swapmoe.profiler.configs import Configuration, allocate, sample, sample_many
from swapmoe.profiler.performance_models import (ENSEMBLE, AccuracyEnsemble, AccuracyModel, LatencyModel, e_memory,
                                                 fit_accuracy, fit_latency, is_held_out)
from swapmoe.profiler.workloads import ProfilingSet, rows
from swapmoe.rpc import convert


# --- configurations -----------------------------------------------------------------
def test_sampling_is_deterministic_for_a_seed_and_a_longer_run_extends_a_shorter_one():
    layers = [16] * 6
    assert sample_many(layers, 20, seed=3) == sample_many(layers, 20, seed=3)
    assert sample_many(layers, 30, seed=3)[:20] == sample_many(layers, 20, seed=3)
    assert sample_many(layers, 20, seed=3) != sample_many(layers, 20, seed=4)


def test_samples_cover_the_budget_range_with_skewed_and_even_allocations():
    layers = [16] * 6
    configs = sample_many(layers, 200, seed=0)
    totals = [sum(c.experts_per_layer) for c in configs]
    assert min(totals) < 30 and max(totals) > 80
    spread = [np.std(c.experts_per_layer) / np.mean(c.experts_per_layer) for c in configs]
    assert sum(max(c.experts_per_layer) - min(c.experts_per_layer) <= 1 for c in configs) >= 20  # even splits
    assert sum(s > 0.5 for s in spread) >= 20  # most experts in a few layers
    assert {c.update_frequency for c in configs} == {2, 4, 8, 16, 32}
    for c in configs:
        assert all(1 <= k <= 16 for k in c.experts_per_layer)


@pytest.mark.parametrize("total", [6, 7, 48, 75, 76])
def test_allocation_keeps_its_total_within_each_layers_bounds(total):
    for seed in range(20):
        shares = np.random.default_rng(seed).dirichlet(np.full(6, 0.2))
        counts = allocate(total, shares, [16, 16, 8, 16, 4, 16])
        assert sum(counts) == total
        assert all(1 <= k <= cap for k, cap in zip(counts, [16, 16, 8, 16, 4, 16]))


def test_allocation_refuses_a_total_no_configuration_has():
    with pytest.raises(ValueError, match="outside"):
        allocate(77, [1, 1], [16, 60])


def test_a_configuration_key_round_trips():
    config = sample([16] * 6, 5)
    assert Configuration.from_key(config.key) == config


LOWER = ("bfloat16", "int8", "int4")


def test_a_configuration_with_precision_round_trips_and_an_older_key_reads_as_the_checkpoints_precision():
    config = Configuration((4, 16, 2), 8, ("int4", "", "bfloat16"))
    assert config.key == "f=8;k=4,16,2;p=int4,,bfloat16" and Configuration.from_key(config.key) == config
    assert config.plan(3).precision == ("int4", "", "bfloat16")
    older = Configuration.from_key("f=8;k=4,16,2")  # as scores.jsonl files from before precisions hold them
    assert older.precision == () and older.precisions == ("", "", "") and older.plan(3).precision == ()
    assert Configuration((4, 16, 2), 8, ("", "", "")) == older and older.key == "f=8;k=4,16,2"


def test_sampling_with_precisions_keeps_the_draws_of_a_run_without_them_and_mixes_precisions():
    # Counts and frequencies are drawn as before: where the precision comes out native, the key is the same
    # and an older profile's score of it still counts.
    for index in range(300):
        a, b = sample([16] * 6, index), sample([16] * 6, index, precisions=LOWER)
        assert (a.experts_per_layer, a.update_frequency) == (b.experts_per_layer, b.update_frequency)
    configs = sample_many([16] * 6, 300, seed=0, precisions=LOWER)
    native = [c for c in configs if not c.precision]
    uniform = [c for c in configs if c.precision and len(set(c.precision)) == 1]
    assert 0.25 < len(native) / 300 < 0.45 and 0.15 < len(uniform) / 300 < 0.35
    assert {c.precision[0] for c in uniform} == set(LOWER)
    assert {p for c in configs for p in c.precisions} == {"", *LOWER}
    assert sample_many([16] * 6, 300, seed=0, precisions=LOWER)[:50] == sample_many([16] * 6, 50, 0, precisions=LOWER)


# --- profiling data -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["code", "prose", "manual", "summarization"])
def test_profiling_and_judging_sets_share_no_document(name):
    profiling, judging = rows(name, "profiling"), rows(name, "judging")
    assert profiling and judging
    assert not {r["source"] for r in profiling} & {r["source"] for r in judging}


def test_a_profiling_set_is_named_by_its_size_and_purpose():
    assert ProfilingSet("lm", texts=3, tokens=256).name == "profiling-lm-3x256"
    with pytest.raises(ValueError, match="kind"):
        ProfilingSet("vision")


# --- E_memory -----------------------------------------------------------------------
def test_e_memory_equals_a_real_executors_accounted_bytes_for_random_plans(tiny_engine):
    """The planner's view (layout and reserve as the executor describes them on the wire)
    predicts exactly what the executor then accounts for."""
    layout = convert.layout_from_pb(convert.layout_to_pb(tiny_engine.layout))
    memory = MemoryModel(layout, convert.reserve_from_pb(convert.reserve_to_pb(tiny_engine.memory_model.reserve)))
    rng = random.Random(0)
    version = tiny_engine.plan.version
    try:
        for _ in range(6):
            config = Configuration(tuple(rng.randint(1, l.num_experts) for l in layout.layers), rng.choice([2, 8]))
            version += 1
            assert tiny_engine.apply_plan(config.plan(version)).accepted
            assert e_memory(memory, config) == tiny_engine.memory().accounted_bytes
    finally:
        full = tuple(l.num_experts for l in layout.layers)
        tiny_engine.apply_plan(Plan(version + 1, full, 4))


# --- E_accuracy ---------------------------------------------------------------------
def _synthetic_rows(count: int) -> list[dict]:
    """Perplexity that grows as layers lose experts, the first layer mattering most."""
    out = []
    for c in sample_many([8, 8, 8], count, seed=1):
        kept = np.array(c.experts_per_layer) / 8
        ppl = 20 * np.exp(2.0 * (1 - kept[0]) ** 2 + 0.5 * (1 - kept[1]) + 0.1 * (1 - kept[2]) + 0.05 / c.update_frequency)
        out.append(dict(key=c.key, experts_per_layer=list(c.experts_per_layer), update_frequency=c.update_frequency,
                        accuracy={"mix": float(ppl)}))
    return out


def _synthetic_rows_with_precision(count: int) -> list[dict]:
    """``_synthetic_rows``' perplexity, and int4 costing accuracy in the first layer above all;
    bfloat16 costs nothing and int8 a little."""
    cost = {"": 0.0, "bfloat16": 0.0, "int8": 0.01, "int4": 0.08}
    out = []
    for c in sample_many([8, 8, 8], count, seed=1, precisions=LOWER):
        kept = np.array(c.experts_per_layer) / 8
        ppl = 20 * np.exp(2.0 * (1 - kept[0]) ** 2 + 0.5 * (1 - kept[1]) + 0.1 * (1 - kept[2]) + 0.05 / c.update_frequency
                          + sum(cost[p] * w for p, w in zip(c.precisions, (3.0, 1.0, 0.5))))
        out.append(dict(key=c.key, experts_per_layer=list(c.experts_per_layer), update_frequency=c.update_frequency,
                        accuracy={"mix": float(ppl)}, **({"precision": list(c.precision)} if c.precision else {})))
    return out


@pytest.mark.slow
def test_e_accuracy_learns_what_each_layers_precision_costs_and_reports_held_out_error_with_precision():
    fitted = fit_accuracy(_synthetic_rows_with_precision(300), "mix", [8, 8, 8], precisions=LOWER)
    model = AccuracyEnsemble.from_json(json.loads(json.dumps(fitted["models"]["ensemble"])))
    assert model.precisions == LOWER
    assert fitted["held_out_with_precision"] > 20
    assert fitted["held_out_error_with_precision"]["ensemble"]["mean_relative_error"] < 0.03
    at = {p: model.predict([Configuration((6, 6, 6), 8, q)])[0] for p, q in
          (("native", ()), ("int4 first", ("int4", "", "")), ("int4 last", ("", "", "int4")), ("int4", ("int4",) * 3))}
    assert at["native"] < at["int4 last"] < at["int4 first"] < at["int4"]
    assert at["int4"] / at["native"] == pytest.approx(np.exp(0.08 * 4.5), rel=0.03)


def test_an_e_accuracy_fitted_before_precisions_predicts_the_checkpoints_and_refuses_a_precision_it_never_saw():
    rng = np.random.default_rng(0)
    old = AccuracyModel("mix", (8, 8), (0.0,) * 5, (1.0,) * 5, (tuple((float(w),) for w in rng.normal(size=5)),),
                        ((0.0,),), 3.0, 0.5)
    assert AccuracyModel.from_json({k: v for k, v in old.to_json().items() if k != "precisions"}) == old
    config = Configuration((4, 8), 4)
    assert old.predict([config])[0] == old.predict_arrays(np.array([[4, 8]]), np.array([4]))[0]
    with pytest.raises(ValueError, match="not profiled with experts at 'int4'"):
        old.predict([Configuration((4, 8), 4, ("int4", ""))])


@pytest.mark.slow
def test_e_accuracy_learns_which_layers_matter_and_reports_held_out_error():
    fitted = fit_accuracy(_synthetic_rows(200), "mix", [8, 8, 8])
    assert fitted["held_out"] > 10 and fitted["trained_on"] > 100
    mlp, linear = fitted["held_out_error"]["mlp"], fitted["held_out_error"]["linear"]
    assert mlp["mean_relative_error"] < 0.02
    assert mlp["mean_relative_error"] < linear["mean_relative_error"]
    model = AccuracyModel.from_json(json.loads(json.dumps(fitted["models"]["mlp"])))
    worse_first = model.predict([Configuration((2, 8, 8), 4)])[0]
    worse_last = model.predict([Configuration((8, 8, 2), 4)])[0]
    assert worse_first > worse_last


@pytest.mark.slow
def test_the_planners_e_accuracy_is_the_geometric_mean_of_networks_from_different_seeds():
    fitted = fit_accuracy(_synthetic_rows(200), "mix", [8, 8, 8])
    ensemble = AccuracyEnsemble.from_json(json.loads(json.dumps(fitted["models"]["ensemble"])))
    assert len(ensemble.members) == ENSEMBLE and ensemble.members[0] == AccuracyModel.from_json(fitted["models"]["mlp"])
    configs = [Configuration((2, 8, 8), 4), Configuration((8, 3, 5), 16)]
    each = np.array([m.predict(configs) for m in ensemble.members])
    assert np.allclose(ensemble.predict(configs), np.exp(np.log(each).mean(axis=0)))
    assert np.allclose(ensemble.predict_arrays(np.array([[2, 8, 8], [8, 3, 5]]), np.array([4, 16])),
                       ensemble.predict(configs))
    assert fitted["held_out_error"]["ensemble"]["mean_relative_error"] < 0.02


def test_held_out_configurations_are_a_fixed_fifth():
    keys = [c.key for c in sample_many([16] * 6, 500)]
    share = np.mean([is_held_out(k) for k in keys])
    assert 0.12 < share < 0.28


def test_too_few_scores_are_a_clear_error():
    with pytest.raises(ValueError, match="too few"):
        fit_accuracy(_synthetic_rows(2), "mix", [8, 8, 8])


# --- E_latency ----------------------------------------------------------------------
def _device_profile(sweep: list[tuple[int, int]]) -> DeviceProfile:
    layout = ModelLayout("mixtral", "MixtralForCausalLM",
                         tuple(LayerLayout(i, f"layers.{i}", 8, 2, 1000) for i in range(2)), 5000)
    layers = tuple(LayerProfile(1000, 64, (ComputeSample(1, 100_000), ComputeSample(4, 160_000))) for _ in range(2))
    return DeviceProfile("n", DeviceInfo("cpu", "x", 1 << 30, 2), "abc", layout, layers,
                         (LoadSample("disk", 50_000, 2e7),), dense_forward_ns=600_000, decode_step_ns=1_000_000,
                         sweep_experts_per_layer=(4, 4),
                         sweep=tuple(SweepPoint(f, ns, 1e9 / ns, 0.0) for f, ns in sweep),
                         inflection_update_frequency=4)


def test_e_latency_adds_update_cost_to_measured_compute_and_never_rewards_more_updates():
    profile = _device_profile([(0, 1_100_000), (16, 1_100_000), (4, 1_110_000), (2, 1_400_000), (1, 1_350_000)])
    model = fit_latency(profile)
    assert model.compute_ns == 600_000 + 2 * 2 * 100_000
    assert model.base_ns == 1_100_000  # the generation loop's own baseline, not just its compute
    assert model.inter_token_ns(Configuration((4, 4), 0)) == pytest.approx(1_100_000)
    frequent = [model.inter_token_ns(Configuration((4, 4), f)) for f in (16, 4, 2, 1)]
    assert frequent == sorted(frequent)  # monotone despite the noisy last point
    assert frequent[-1] > 1_300_000
    assert model.inter_token_ns(Configuration((8, 8), 1)) == pytest.approx(model.base_ns)  # nothing to load
    assert model.tokens_per_second(Configuration((4, 4), 0)) == pytest.approx(1e9 / 1_100_000)


def test_the_batch_ratio_is_measured_monotone_and_extends_past_the_largest_batch():
    profile = dataclasses.replace(_device_profile([(0, 1_100_000)]), batch_decode=(
        BatchDecodePoint(1, 100), BatchDecodePoint(2, 95), BatchDecodePoint(4, 160), BatchDecodePoint(8, 240)))
    model = fit_latency(profile)
    assert model.batch_rows == (1, 2, 4, 8)
    ratio = model.pass_ratio(np.array([1, 2, 3, 4, 8, 10]))
    assert ratio[0] == 1.0 and (np.diff(ratio) >= 0).all()  # 2 rows measured faster than 1: noise, flattened
    assert ratio[4] == pytest.approx(2.4) and ratio[5] == pytest.approx(2.4 + 2 * 0.8 / 4)
    assert LatencyModel.from_json(model.to_json()) == model
    assert list(fit_latency(dataclasses.replace(profile, batch_decode=())).pass_ratio(np.array([1, 4]))) == [1, 4]


def _precision_profile(**changes) -> DeviceProfile:
    """``_device_profile`` of an executor that keeps int8 and int4 experts and timed a pass at each."""
    base = _device_profile([(0, 1_000_000), (8, 1_000_000), (2, 1_200_000)])
    layout = dataclasses.replace(base.layout, layers=tuple(
        dataclasses.replace(l, precisions=(("int8", 270), ("int4", 160))) for l in base.layout.layers))
    points = (PrecisionPoint("", 1_000_000), PrecisionPoint("int8", 900_000), PrecisionPoint("int4", 800_000))
    return dataclasses.replace(base, layout=layout, precision_points=points, **changes)


def test_e_latency_runs_a_pass_at_each_precisions_measured_speed_and_an_older_profile_at_the_checkpoints():
    model = fit_latency(_precision_profile())
    assert (model.precision_names, model.precision_ratio, model.precision_bytes) == \
        (("int8", "int4"), (0.9, 0.8), (0.27, 0.16))
    native = model.inter_token_ns(Configuration((4, 4), 0))
    assert model.inter_token_ns(Configuration((4, 4), 0, ("int4", "int4"))) == pytest.approx(0.8 * native)
    assert model.inter_token_ns(Configuration((4, 4), 0, ("int4", ""))) == pytest.approx(0.9 * native)
    overhead = [model.inter_token_ns(Configuration((4, 4), 2, p)) - model.inter_token_ns(Configuration((4, 4), 0, p))
                for p in ((), ("int4", "int4"))]
    assert overhead[1] == pytest.approx(0.16 * overhead[0])  # an update loads int4's bytes
    assert LatencyModel.from_json(model.to_json()) == model
    # The sweep ran at int4 (the plan in force): the baseline at the checkpoint's is the slower one.
    at_int4 = fit_latency(_precision_profile(sweep_precision=("int4", "int4")))
    assert at_int4.base_ns == pytest.approx(native / 0.8)
    older = fit_latency(dataclasses.replace(_precision_profile(), precision_points=()))
    assert older.inter_token_ns(Configuration((4, 4), 0, ("int4", "int4"))) == pytest.approx(native)
    body = {k: v for k, v in model.to_json().items() if not k.startswith("precision")}  # an e_latency.json of before
    assert LatencyModel.from_json(body).inter_token_ns(Configuration((4, 4), 0, ("int4", "int4"))) == \
        pytest.approx(native)


def test_a_device_profile_with_precision_points_round_trips_through_its_file_and_the_wire(tmp_path):
    from swapmoe.profiler.report import load_device, save_device

    profile = _precision_profile(sweep_precision=("int8", ""))
    directory = save_device(tmp_path, profile)
    assert load_device(directory, "abc") == profile
    assert "every layer's experts at each precision: float32 1.00 ms, int8 0.90 ms, int4 0.80 ms" in \
        (directory / "summary.md").read_text()
    assert convert.device_profile_from_pb(convert.device_profile_to_pb(profile)) == profile


# --- stored profiles ----------------------------------------------------------------
def test_profiles_round_trip_and_refuse_another_model_or_format(tmp_path):
    path = tmp_path / "profile.json"
    artifacts.write_json(path, "accuracy-profile", {"model_fingerprint": "aaaa", "seed": 1})
    assert artifacts.read_json(path, "accuracy-profile", "aaaa")["seed"] == 1
    with pytest.raises(artifacts.ProfileError, match="built for model aaaa, not for this model \\(bbbb\\)"):
        artifacts.read_json(path, "accuracy-profile", "bbbb")
    with pytest.raises(artifacts.ProfileError, match="is not a device profile"):
        artifacts.read_json(path, "device", "aaaa")
    path.write_text(json.dumps({"format": 99, "kind": "accuracy-profile"}))
    with pytest.raises(artifacts.ProfileError, match="format 99"):
        artifacts.read_json(path, "accuracy-profile")
    with pytest.raises(artifacts.ProfileError, match="no device profile"):
        artifacts.read_json(tmp_path / "missing.json", "device")


def test_a_score_line_cut_off_by_a_crash_is_dropped_and_the_next_append_is_clean(tmp_path):
    path = tmp_path / artifacts.SCORES
    artifacts.append_score(path, {"key": "a"})
    with path.open("a") as f:
        f.write('{"key": "b", "acc')
    assert [r["key"] for r in artifacts.read_scores(path)] == ["a"]
    artifacts.append_score(path, {"key": "c"})
    assert [r["key"] for r in artifacts.read_scores(path)] == ["a", "c"]


def test_a_device_profile_round_trips_with_its_e_latency_and_is_refused_for_another_model(tmp_path):
    from swapmoe.profiler.report import load_device, load_latency_model, save_device

    profile = dataclasses.replace(_device_profile([(0, 1_000_000), (8, 1_000_000), (2, 1_200_000)]),
                                  batch_decode=(BatchDecodePoint(1, 100), BatchDecodePoint(4, 150)))
    directory = save_device(tmp_path, profile)
    assert directory == artifacts.device_dir(tmp_path, "abc", "x-n")
    assert load_device(directory, "abc") == profile
    assert load_latency_model(directory, "abc") == fit_latency(profile)
    assert "inflection: **4**" in (directory / "summary.md").read_text()
    assert "4 rows 0.00 ms" in (directory / "summary.md").read_text()  # the batch sizes survive a restart too
    with pytest.raises(artifacts.ProfileError, match="built for model abc"):
        load_device(directory, "another")
