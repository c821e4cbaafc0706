"""Turning raw measurements into a stored profile: fitted models, a summary table, plots.

An accuracy profile directory gets ``e_accuracy.json`` (per workload: E_accuracy, the linear
model it is compared with, their held-out errors, the reference accuracy and the activation
histograms) and ``summary.md``; a device profile directory gets ``device.json``,
``e_latency.json`` and ``summary.md``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from swapmoe.core.device_profile import (BatchDecodePoint, ComputeSample, DeviceProfile, LayerProfile, LoadSample,
                                         OnDemandPoint, PrecisionPoint, SweepPoint, ThreadPoint)
from swapmoe.core.layout import DeviceInfo, LayerLayout, ModelLayout
from swapmoe.core.sizes import format_size
from swapmoe.profiler import artifacts
from swapmoe.profiler.accuracy import workload_histograms
from swapmoe.profiler.performance_models import AccuracyEnsemble, AccuracyModel, LatencyModel, fit_accuracy, fit_latency

ACCURACY_KIND, DEVICE_KIND, E_ACCURACY_KIND, E_LATENCY_KIND = "accuracy-profile", "device", "e-accuracy", "e-latency"


# --- accuracy -------------------------------------------------------------------------
def finish_accuracy(directory: Path, fingerprint: str | None = None) -> dict:
    """Fit E_accuracy per workload on ``directory``'s scores; write ``e_accuracy.json`` and the summary."""
    meta = artifacts.read_json(directory / "profile.json", ACCURACY_KIND, fingerprint)
    rows = artifacts.read_scores(directory / artifacts.SCORES)
    num_experts = meta["num_experts"]
    full = [r for r in rows if r["experts_per_layer"] == num_experts and not r.get("precision")]
    workloads = sorted(rows[0]["accuracy"]) if rows else []
    body = dict(model_fingerprint=meta["model_fingerprint"], num_experts=num_experts, configurations=len(rows),
                reference_accuracy=full[0]["accuracy"] if full else {},
                histograms=workload_histograms(rows),
                workloads={w: fit_accuracy(rows, w, num_experts, seed=meta["seed"],
                                           precisions=meta.get("precisions", ())) for w in workloads})
    artifacts.write_json(directory / "e_accuracy.json", E_ACCURACY_KIND, body)
    (directory / "summary.md").write_text(accuracy_summary(meta, rows, body))
    return body


def load_accuracy_ensembles(directory: Path, fingerprint: str | None = None) -> dict[str, AccuracyEnsemble]:
    """E_accuracy's ensemble per workload (a profile fitted before ensembles: its one network)."""
    body = artifacts.read_json(directory / "e_accuracy.json", E_ACCURACY_KIND, fingerprint)
    return {w: AccuracyEnsemble.from_json(fit["models"]["ensemble"]) if "ensemble" in fit["models"]
            else AccuracyEnsemble((AccuracyModel.from_json(fit["models"]["mlp"]),))
            for w, fit in body["workloads"].items()}


def accuracy_summary(meta: dict, rows: list[dict], body: dict) -> str:
    seconds = sum(r["seconds"] for r in rows)
    lines = [f"# Accuracy profile of model {meta['model_fingerprint']}", "",
             f"Profiling set: {_describe_set(meta['profiling_set'])}; {len(rows)} configurations scored "
             f"({seconds / 60:.1f} worker-minutes), seed {meta['seed']}.", "",
             "| workload | full model | configurations | E_accuracy held-out mean rel. error | ensemble | linear "
             "| E_accuracy rank corr. |",
             "|---|---|---|---|---|---|---|"]
    for workload, fit in body["workloads"].items():
        err = fit["held_out_error"]
        lines.append(f"| {workload} | {body['reference_accuracy'].get(workload, float('nan')):.3f} | "
                     f"{fit['trained_on']} fit + {fit['held_out']} held out | "
                     f"{err['mlp']['mean_relative_error']:.2%} | "
                     f"{err.get('ensemble', err['mlp'])['mean_relative_error']:.2%} | {err['linear']['mean_relative_error']:.2%} | "
                     f"{err['mlp']['spearman']:.3f} |")
    lowered = {w: fit for w, fit in body["workloads"].items() if fit.get("held_out_with_precision")}
    if lowered:
        lines += ["", f"Experts at lower precisions ({', '.join(meta.get('precisions', ()))}): of the held-out "
                      "configurations, those with some layer below the checkpoint's precision, E_accuracy's (ensemble) "
                      "mean relative error: " + ", ".join(
                          f"{w} {fit['held_out_error_with_precision']['ensemble']['mean_relative_error']:.2%} "
                          f"({fit['held_out_with_precision']})" for w, fit in lowered.items()) + "."]
    return "\n".join(lines) + "\n"


def _describe_set(spec: dict) -> str:
    if spec.get("kind") == "lm":
        return f"{spec['texts']} {spec['purpose']} texts x {spec['tokens']} tokens per domain (perplexity)"
    return f"{spec.get('pairs')} {spec.get('purpose')} code/summary pairs (Rouge-2)"


# --- device ---------------------------------------------------------------------------
def save_device(root: Path, profile: DeviceProfile) -> Path:
    """Store ``profile`` under (its model, its device) with its fitted E_latency; returns the directory."""
    directory = artifacts.device_dir(root, profile.model_fingerprint, f"{profile.device.name}-{profile.node_id}")
    artifacts.write_json(directory / "device.json", DEVICE_KIND, dataclasses.asdict(profile))
    latency = fit_latency(profile)
    artifacts.write_json(directory / "e_latency.json", E_LATENCY_KIND,
                         dict(model_fingerprint=profile.model_fingerprint, **latency.to_json()))
    (directory / "summary.md").write_text(device_summary(profile, latency))
    return directory


def load_device(directory: Path, fingerprint: str | None = None) -> DeviceProfile:
    body = artifacts.read_json(directory / "device.json", DEVICE_KIND, fingerprint)
    layout = body["layout"]
    return DeviceProfile(
        node_id=body["node_id"], device=DeviceInfo(**body["device"]), model_fingerprint=body["model_fingerprint"],
        layout=ModelLayout(**{**layout, "layers": tuple(LayerLayout(**{**l, "precisions": tuple(
            tuple(p) for p in l.get("precisions", ()))}) for l in layout["layers"])}),
        layers=tuple(LayerProfile(l["bytes_per_expert"], l["activation_bytes_per_token"],
                                  tuple(ComputeSample(**c) for c in l["compute"])) for l in body["layers"]),
        loads=tuple(LoadSample(**l) for l in body["loads"]),
        dense_forward_ns=body["dense_forward_ns"], decode_step_ns=body["decode_step_ns"],
        sweep_experts_per_layer=tuple(body["sweep_experts_per_layer"]),
        sweep=tuple(SweepPoint(**p) for p in body["sweep"]),
        inflection_update_frequency=body["inflection_update_frequency"],
        on_demand=OnDemandPoint(**body["on_demand"]) if body.get("on_demand") else None,
        batch_decode=tuple(BatchDecodePoint(**p) for p in body.get("batch_decode", ())),
        thread_points=tuple(ThreadPoint(**p) for p in body.get("thread_points", ())), threads=body.get("threads", 0),
        precision_points=tuple(PrecisionPoint(**p) for p in body.get("precision_points", ())),
        sweep_precision=tuple(body.get("sweep_precision", ())))


def load_latency_model(directory: Path, fingerprint: str | None = None) -> LatencyModel:
    body = artifacts.read_json(directory / "e_latency.json", E_LATENCY_KIND, fingerprint)
    return LatencyModel.from_json(body)


def device_summary(profile: DeviceProfile, latency: LatencyModel) -> str:
    lines = [f"# Device profile: {profile.device.name} ({profile.device.kind}), node {profile.node_id}", "",
             f"Model {profile.model_fingerprint}: dense part of a decode step {profile.dense_forward_ns / 1e6:.2f} ms, "
             f"whole step {profile.decode_step_ns / 1e6:.2f} ms; E_latency: {latency.base_ns / 1e6:.2f} ms between "
             f"tokens without updates (compute {latency.compute_ns / 1e6:.2f} ms).", "",
             "| layer | bytes per expert | activations per token | expert forward, 1 token |", "|---|---|---|---|"]
    for i, layer in enumerate(profile.layers):
        one = min(layer.compute, key=lambda c: c.tokens) if layer.compute else None
        lines.append(f"| {i} | {format_size(layer.bytes_per_expert)} | {format_size(layer.activation_bytes_per_token)} "
                     f"| {one.expert_forward_ns / 1e3:.1f} µs |" if one else f"| {i} | | | |")
    lines += ["", "| load tier | expert load | bandwidth |", "|---|---|---|"]
    lines += [f"| {l.tier} | {l.expert_load_ns / 1e3:.1f} µs | {l.bytes_per_second / 2**20:.0f} MiB/s |"
              for l in profile.loads]
    lines += ["", f"Update-frequency sweep at experts per layer {list(profile.sweep_experts_per_layer)} "
                  f"(0 = never update); inflection: **{profile.inflection_update_frequency}**.", "",
              "| update frequency | inter-token latency | tokens/s | loads per token |", "|---|---|---|---|"]
    lines += [f"| {p.update_frequency} | {p.inter_token_ns / 1e6:.2f} ms | {p.tokens_per_second:.1f} | "
              f"{p.loads_per_token:.2f} |" for p in profile.sweep]
    if profile.batch_decode:
        lines += ["", "A decode pass by batch size: " + ", ".join(f"{p.rows} rows {p.step_ns / 1e6:.2f} ms"
                                                             for p in profile.batch_decode) + "."]
    if profile.thread_points:
        lines += ["", "A decode pass by torch intra-op threads, with an expert load beside it: "
                  + ", ".join(f"{p.threads} {p.step_ns / 1e6:.2f} ms" for p in profile.thread_points)
                  + f"; chosen: **{profile.threads}**."]
    if profile.precision_points:
        lines += ["", "A decode pass with every layer's experts at each precision: " + ", ".join(
            f"{p.precision or profile.layout.dtype} {p.step_ns / 1e6:.2f} ms" for p in profile.precision_points) + "."]
    if profile.on_demand is not None:
        miss = profile.miss_ns()
        lines += ["", f"On-demand loading at the same plan: {profile.on_demand.inter_token_ns / 1e6:.2f} ms between "
                      f"tokens, {profile.on_demand.misses_per_token:.2f} synchronous loads per token"
                      + (f": {miss / 1e3:.0f} µs per miss." if miss is not None else ".")]
    return "\n".join(lines) + "\n"


def show(directory: Path) -> str:
    """The stored summary of an accuracy or device profile directory."""
    summary = Path(directory) / "summary.md"
    if not summary.exists():
        if (Path(directory) / "profile.json").exists():
            finish_accuracy(Path(directory))
        else:
            raise artifacts.ProfileError(f"{directory} holds no profile (no summary.md or profile.json)")
    return summary.read_text()
