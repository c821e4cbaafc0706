"""The observations SwapMoE rests on (paper section 2.2 and its summary), measured on the
unmodified bundled LM: temporal locality of expert activations (consecutive tokens and windows of
one input reuse experts more than routing at random with the same histogram would), and
interchangeability (replacing a share of each token's routed experts by others costs little
perplexity, so masked gating, which re-routes to resident experts, loses little).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from benchmarks.paper.context import Context
from benchmarks.paper.figures import Figures
from benchmarks.paper.tables import num, pct, ratio, share, table

REPLACED = (0.25, 0.5, 0.75, 1.0)  # of each token's routed experts
MODES = {"random": "a random non-chosen expert", "next": "the router's next-ranked experts",
         "skip": "nothing (skipped: gate weight 0)"}
SHUFFLES = 5  # draws of each random-routing baseline


# --- measuring -----------------------------------------------------------------------------------

def _model(ctx: Context):
    from swapmoe.executor.adapters import adapter_for, find_moe_blocks
    from swapmoe.executor.checkpoint import load_checkpoint

    model = load_checkpoint(ctx.lm, experts_implementation=None).model
    routers = [getattr(b.module, adapter_for(model).router_attr) for b in find_moe_blocks(model)]
    return model, routers


def _pairs(choices: np.ndarray, window: int, num_experts: int, prior: np.ndarray, capacity: int) -> dict:
    """Per pair of consecutive windows of one text: ``reuse``, the share of the next window's
    routed assignments that go to experts the previous window used; ``recent``, the share that
    go to the previous window's ``capacity`` most used experts (ties by ``prior``, the layer's
    usage over the corpus): a resident set of that size moved to the last window; ``static``, the
    share that go to the corpus's ``capacity`` most used (a pruned model's set); and each
    window's distinct experts."""
    from swapmoe.models.routing_stats import membership

    member = membership(choices, num_experts)
    assignments = window * choices.shape[1]
    counts = [member[s:s + window] for s in range(0, len(member) - window + 1, window)]
    static = np.argsort(-prior, kind="stable")[:capacity]
    out = dict(reuse=[], recent=[], static=[], distinct=[float(c.any(axis=0).sum()) for c in counts])
    for prev, nxt in zip(counts, counts[1:]):
        used = prev.sum(axis=0)
        recent = np.argsort(-(used + 1e-3 * prior), kind="stable")[:capacity]
        out["reuse"].append(float((nxt & (used > 0)).sum() / assignments))
        out["recent"].append(float(nxt[:, recent].sum() / assignments))
        out["static"].append(float(nxt[:, static].sum() / assignments))
    return out


def _window_stats(per_text: list[np.ndarray], window: int, num_experts: int, seed: int) -> dict:
    """The statistics of ``_pairs`` as measured, and with tokens shuffled within each text (its
    own histogram) and across all texts (the layer's histogram over the corpus)."""
    from swapmoe.models.routing_stats import usage

    rng = np.random.default_rng(seed)
    pooled = np.concatenate(per_text)
    prior, capacity = usage(pooled, num_experts), max(1, num_experts // 4)

    def gather(texts: list[np.ndarray]) -> dict:
        out = dict(reuse=[], recent=[], static=[], distinct=[])
        for c in texts:
            for key, values in _pairs(c, window, num_experts, prior, capacity).items():
                out[key] += values
        return out

    measured, within, corpus = gather(per_text), gather([]), gather([])
    for _ in range(SHUFFLES):
        for key, values in gather([c[rng.permutation(len(c))] for c in per_text]).items():
            within[key] += values
        shuffled, bounds = pooled[rng.permutation(len(pooled))], np.cumsum([0] + [len(c) for c in per_text])
        for key, values in gather([shuffled[a:b] for a, b in zip(bounds, bounds[1:])]).items():
            corpus[key] += values
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return dict(window=window, capacity=capacity, reuse=mean(measured["reuse"]),
                within_text_shuffled=mean(within["reuse"]), corpus_shuffled=mean(corpus["reuse"]),
                recent=mean(measured["recent"]), recent_within_shuffled=mean(within["recent"]),
                recent_corpus_shuffled=mean(corpus["recent"]), static=mean(measured["static"]),
                distinct_experts=mean(measured["distinct"]), pairs=len(measured["reuse"]))


@torch.inference_mode()
def _temporal(model, routers, texts: dict[str, list[list[int]]], windows: tuple[int, ...]) -> dict:
    from swapmoe.models.evaluate import RoutingRecorder

    recorder = RoutingRecorder(model)
    per_layer: list[list[np.ndarray]] = [[] for _ in routers]
    domain_of = []
    for domain, rows in texts.items():
        for ids in rows:
            model(input_ids=torch.tensor([ids]))
            for layer, choices in enumerate(recorder.take()):
                per_layer[layer].append(choices)
            domain_of.append(domain)
    num_experts = routers[0].num_experts
    layers = [[_window_stats(texts_, w, num_experts, seed=layer * 100 + w) for w in windows]
              for layer, texts_ in enumerate(per_layer)]
    domains = {d: [_window_stats([c for c, dd in zip(texts_, domain_of) if dd == d], windows[1], num_experts,
                                 seed=layer)["reuse"] for layer, texts_ in enumerate(per_layer)]
               for d in texts}
    # Means over layers, per window: kept as numbers of their own, as the tables show them
    means = [{key: float(np.mean([layer[i][key] for layer in layers])) for key in layers[0][i]}
             for i in range(len(windows))]
    return dict(windows=list(windows), num_experts=num_experts, top_k=routers[0].top_k, layers=layers, means=means,
                domain_window=windows[1], domains=domains)


class Interchange:
    """Forward hooks on the routers that replace a share of each token's routed experts."""

    def __init__(self, routers, mode: str, fraction: float, seed: int, layers: set[int] | None = None):
        self.mode, self.fraction = mode, fraction
        self.generator = torch.Generator().manual_seed(seed)
        self.handles = [r.register_forward_hook(self._hook) for i, r in enumerate(routers)
                        if layers is None or i in layers]

    def _hook(self, _module, _inputs, out):
        logits, weights, index = out
        flat = logits.reshape(index.shape[0], -1)
        replace = torch.rand(index.shape, generator=self.generator) < self.fraction
        if self.mode == "skip":
            return logits, weights.masked_fill(replace, 0.0), index
        chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, index, True)
        if self.mode == "next":  # the best experts the router did not choose, in its order
            score = flat.float()
        else:
            score = torch.rand(flat.shape, generator=self.generator)
        substitutes = score.masked_fill(chosen, float("-inf")).topk(index.shape[1], dim=-1).indices
        order = (replace.long().cumsum(dim=1) - 1).clamp(min=0)  # the n-th replaced slot takes the n-th substitute
        return logits, weights, torch.where(replace, substitutes.gather(1, order), index)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.inference_mode()
def _perplexity(model, texts: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for ids in texts:
        x = torch.tensor([ids])
        n = x.shape[1] - 1
        nll += model(input_ids=x, labels=x).loss.item() * n
        count += n
    return math.exp(nll / count)


def _replaced(model, routers, texts, mode, fraction, seeds, layers=None) -> dict:
    values = []
    for seed in range(seeds):
        hooks = Interchange(routers, mode, fraction, seed, layers)
        try:
            values.append(_perplexity(model, texts))
        finally:
            hooks.remove()
    return dict(mode=mode, replaced=fraction, perplexity=float(np.mean(values)), low=min(values), high=max(values))


def measure(ctx: Context) -> dict:
    from tqdm import tqdm

    model, routers = _model(ctx)
    windows = (1, 4, 16) if ctx.quick else (1, 4, 16, 64)
    temporal = _temporal(model, routers, ctx.texts, windows)
    texts = [ids for rows in ctx.texts.values() for ids in rows]
    seeds = 1 if ctx.quick else 3
    full = _perplexity(model, texts)
    runs = [(m, f) for m in MODES for f in REPLACED]
    curves = [_replaced(model, routers, texts, m, f, seeds if m != "next" else 1)
              for m, f in tqdm(runs, desc="interchangeability", unit="run", file=sys.stderr)]
    per_layer = [_replaced(model, routers, texts, "random", 1.0, seeds, {layer})["perplexity"]
                 for layer in range(len(routers))]
    return dict(temporal=temporal, full_perplexity=full, texts=len(texts), tokens=sum(len(t) for t in texts),
                seeds=seeds, curves=curves, one_layer_random=per_layer)


# --- rendering -----------------------------------------------------------------------------------

def render(results: dict, figures: Figures) -> list[str]:
    t = results["temporal"]
    layers = t["layers"]
    m = lambda i, key: t["means"][i][key]  # noqa: E731
    capacity = layers[0][0]["capacity"]
    lines = [
        "## Locality and interchangeability of experts (paper section 2.2)",
        "",
        f"The unmodified bundled LM ({len(layers)} MoE layers, {t['num_experts']:.0f} experts, top-{t['top_k']:.0f}) "
        f"over {results['texts']:.0f} held-out texts, every domain's together ({results['tokens']:.0f} tokens), routing "
        "recorded per layer and cut into consecutive windows of w tokens. **Reuse**: the share of the next "
        "window's routed assignments that go to experts the previous window used (a cache holding the last "
        "window's experts hits this often). Baselines: the same tokens shuffled within each text (the text's "
        f"own expert histogram, order lost), and across all texts (the layer's histogram), {SHUFFLES} shuffles "
        "each. Means over layers:",
        "",
        *table(("window (tokens)", "reuse", "shuffled within text", "shuffled across texts", "vs across texts",
                "distinct experts per window", "of all"),
               [[f"{w['window']:.0f}", m(i, "reuse"), m(i, "within_text_shuffled"), m(i, "corpus_shuffled"),
                 ratio(m(i, "reuse"), m(i, "corpus_shuffled")), m(i, "distinct_experts"),
                 pct(m(i, "distinct_experts") / t["num_experts"])] for i, w in enumerate(t["means"])]),
        f"A resident set of {capacity:.0f} experts per layer ({pct(capacity / t['num_experts'])} of them): the share "
        "of the next window's assignments it serves when it holds the previous window's most used experts "
        "(SwapMoE's idea, updated every window), against the same on shuffled routing, and against the "
        "corpus's most used experts held fixed (a pruned model's set, chosen with hindsight on these very texts):",
        "",
        *table(("window (tokens)", "last window's top", "shuffled within text", "shuffled across texts",
                "static top (pruning)", "last window vs static"),
               [[f"{w['window']:.0f}", m(i, "recent"), m(i, "recent_within_shuffled"), m(i, "recent_corpus_shuffled"),
                 m(i, "static"), ratio(m(i, "recent"), m(i, "static"))] for i, w in enumerate(t["means"])]),
        f"Reuse per layer at a window of {t['domain_window']:.0f} tokens, per domain and over all texts:",
        "",
        *table(["layer", *(f"{d}" for d in t["domains"]), "all", "shuffled within text", "shuffled across texts"],
               [[f"{n}", *(t["domains"][d][n] for d in t["domains"]), row[1]["reuse"], row[1]["within_text_shuffled"],
                 row[1]["corpus_shuffled"]] for n, row in enumerate(layers)]),
        _locality_figure(results, figures),
        "",
    ]
    lines += _interchange(results, figures)
    return lines


def _locality_figure(results: dict, figures: Figures) -> str:
    t = results["temporal"]
    layers = t["layers"]
    fig, axes = figures.new(3, width=4.6, height=3.6)
    ax = axes[0][0]
    for n, layer in enumerate(layers):
        line, = ax.plot([w["window"] for w in layer], [w["reuse"] for w in layer], marker="o", label=f"layer {n}")
        ax.plot([w["window"] for w in layer], [w["corpus_shuffled"] for w in layer], linestyle=":",
                color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("window, tokens")
    ax.set_ylabel("reuse of the previous window's experts")
    ax.set_title("reuse (solid) vs shuffled across texts (dotted)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[0][1]
    for key, label in (("reuse", "measured"), ("within_text_shuffled", "shuffled within text"),
                       ("corpus_shuffled", "shuffled across texts")):
        ax.plot(range(len(layers)), [layer[1][key] for layer in layers], marker="o", label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("reuse")
    ax.set_title(f"reuse per layer, window {t['domain_window']:.0f} tokens", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[0][2]
    windows = [w["window"] for w in layers[0]]
    for key, label in (("recent", "last window's top"), ("recent_corpus_shuffled", "same, shuffled across texts"),
                       ("static", "static top (pruning)")):
        ax.plot(windows, [mean[key] for mean in t["means"]], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("window, tokens")
    ax.set_ylabel("share of next window's assignments served")
    ax.set_title(f"a resident set of {layers[0][0]['capacity']:.0f} experts per layer", fontsize=9)
    ax.legend(fontsize=7)
    return figures.save(fig, "locality", "Temporal locality of expert activations per layer and window")


def _interchange(results: dict, figures: Figures) -> list[str]:
    full = results["full_perplexity"]
    by_mode = {m: [c for c in results["curves"] if c["mode"] == m] for m in MODES}
    fractions = [c["replaced"] for c in by_mode["random"]]
    lines = [
        "Interchangeability: a forward hook on every router replaces a share of each token's routed experts "
        f"(each assignment independently) by {MODES['random']}, by {MODES['next']}, or by nothing, keeping the "
        f"gate weights; perplexity over the same texts ({results['seeds']:.0f} seed(s) for the random draws). "
        f"The full model: {num(full)}.",
        "",
        *table(["replaced", *(f"{m}: perplexity" for m in MODES), *(f"{m}: vs full" for m in MODES)],
               [[share(f), *(c["perplexity"] for c in row), *(ratio(c["perplexity"], full) for c in row)]
                for f, row in zip(fractions, zip(*(by_mode[m] for m in MODES)))]),
        "Every routed expert of one layer replaced at random, the other layers untouched:",
        "",
        *table(["layer", "perplexity", "vs full"],
               [[f"{n}", p, ratio(p, full)] for n, p in enumerate(results["one_layer_random"])]),
    ]
    fig, axes = figures.new(2, width=5.0, height=3.6)
    ax = axes[0][0]
    for m, curve in by_mode.items():
        ax.plot([0.0] + [c["replaced"] for c in curve], [full] + [c["perplexity"] for c in curve], marker="o", label=m)
        ax.fill_between([c["replaced"] for c in curve], [c["low"] for c in curve], [c["high"] for c in curve], alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("share of each token's routed experts replaced")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity vs replaced share", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[0][1]
    ax.bar(range(len(results["one_layer_random"])), results["one_layer_random"])
    ax.axhline(full, color="k", linestyle="--", linewidth=1, label="full model")
    ax.set_yscale("log")
    ax.set_xlabel("layer with all its experts replaced at random")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=8)
    lines += [figures.save(fig, "interchangeability", "Perplexity with routed experts replaced"), ""]
    half = _half(results, "random")
    lines += [f"Replacing {share(half['replaced'])} of the routed experts at random takes perplexity from {num(full)} to "
              f"{num(half['perplexity'])} ({ratio(half['perplexity'], full)}).", ""]
    return lines


# --- claims --------------------------------------------------------------------------------------

def claims(results: dict) -> list[tuple[str, str, str, str]]:
    t = results["temporal"]
    layers = t["layers"]
    reuse = [(w["window"], w["reuse"], w["corpus_shuffled"], w["within_text_shuffled"]) for w in t["means"]]
    above = [r > c for _, r, c, _ in reuse]
    layers_above = [layer[1]["reuse"] > layer[1]["corpus_shuffled"] for layer in layers]
    within = [r > s for _, r, _, s in reuse]
    recent = [(w["window"], w["recent"], w["static"]) for w in t["means"]]
    full = results["full_perplexity"]
    half_random, half_next, half_skip = (_half(results, m)["perplexity"] for m in ("random", "next", "skip"))
    return [
        ("Expert activations have temporal locality: consecutive windows reuse experts more than chance",
         "Sec. 2.2: successive tokens \"mostly belong to the same semantic context\"; summary: \"most frames "
         "activate the same experts repeatedly\"",
         "reuse vs shuffled across texts: " + "; ".join(f"{w:.0f} tok: {pct(r)} vs {pct(c)}" for w, r, c, _ in reuse),
         _verdict(above)),
        ("... in every layer",
         "-", f"reuse / shuffled across texts at window {t['domain_window']:.0f}, per layer: "
         + ", ".join(ratio(layer[1]["reuse"], layer[1]["corpus_shuffled"]) for layer in layers),
         _verdict(layers_above)),
        ("... and beyond the input's own expert histogram (order matters, not only the topic)",
         "Sec. 2.2: tokens are produced one by one in the same context",
         "reuse vs shuffled within text: " + "; ".join(f"{w:.0f} tok: {pct(r)} vs {pct(s)}" for w, r, _, s in reuse),
         _verdict(within)),
        (f"A resident set of {layers[0][0]['capacity']:.0f} experts per layer that follows the last window serves "
         "more assignments than a static one (pruning)",
         "Sec. 4.2: SwapMoE beats pruning as it selects experts \"based on the characteristics of input samples, "
         "rather than simply pruning the MoE model into a smaller but static model\"",
         "last window's top vs static top: " + "; ".join(f"{w:.0f} tok: {pct(r)} vs {pct(s)}" for w, r, s in recent),
         _verdict([r > s for _, r, s in recent])),
        ("Experts are interchangeable: swapping 50% of routed experts at random costs little",
         "summary: accuracy 52.22 -> 52.12 with 50% of experts randomly swapped",
         f"perplexity {num(full)} -> {num(half_random)} ({ratio(half_random, full)})",
         "yes" if half_random <= full * 1.1 else "partly" if half_random <= full * 1.5 else "no"),
        ("... within one layer: all of one layer's routed experts replaced at random costs under 1.5x perplexity",
         "summary: experts \"can be interchangeable for most input examples\"",
         "per layer: " + ", ".join(ratio(p, full) for p in results["one_layer_random"]),
         _verdict([p <= full * 1.5 for p in results["one_layer_random"]])),
        ("Expert computation is skippable: dropping 50% of routed experts costs little",
         "summary: accuracy 52.22 -> 52.15 when skipping some expert computations",
         f"perplexity {num(full)} -> {num(half_skip)} ({ratio(half_skip, full)})",
         "yes" if half_skip <= full * 1.1 else "partly" if half_skip <= full * 1.5 else "no"),
        ("(not in the paper) Substituting the router's next-ranked experts beats random substitutes",
         "-", f"perplexity at 50% replaced: next-ranked {num(half_next)} vs random {num(half_random)}",
         "yes" if half_next < half_random else "no"),
    ]


def _half(results: dict, mode: str) -> dict:
    """``mode``'s run with half of the routed experts replaced (by position: the results' shares
    are numbers to render, not keys)."""
    return [c for c in results["curves"] if c["mode"] == mode][REPLACED.index(0.5)]


def _verdict(flags: list[bool]) -> str:
    return "yes" if flags and all(flags) else "partly" if any(flags) else "no"
