"""Memory, latency and quality across budgets (paper Figures 7 and 8, Table 1) and the expert
I/O of each configuration (Table 2), on the bundled models.

At each budget (a share of all experts, from one expert per layer to every expert) the
language model runs, with the same experts per layer (the planner's plan for the mix of
domains, so every method holds the same bytes): virtual experts as planned, pruning (the
same plan, never updated), on-demand LRU loading (exact), and on-demand LRU with speculative
prefetch of the next layer's experts, the stronger peer. The unmodified model is the reference.
The Switch summarizer runs the same methods on an even split (the planner's shipped profile is
the language model's), scored by Rouge-2.
"""

from __future__ import annotations

import json
import math
import sys

from benchmarks.paper import planned
from benchmarks.paper.context import Context
from benchmarks.paper.subjects import (MG, ON_DEMAND, Setup, Subject, interleaved_speed, measure_perplexity,
                                       measure_rouge2)
from benchmarks.paper.tables import num, pct, share, table

METHODS = ("virtual experts", "pruning", "on-demand LRU", "on-demand LRU + prefetch")


def shares(ctx: Context) -> tuple[float, ...]:
    cap = planned.capacity()
    least = len(cap) / sum(cap)  # one expert per layer
    return (0.25, 0.5) if ctx.quick else (least, 0.25, 0.5, 0.75, 1.0)


def setups(plan: planned.Planned | None, experts: tuple[int, ...] | None,
           even: tuple[int, ...] | None = None) -> list[Setup]:
    """Every method at one budget (``experts``; None: the unmodified model alone): virtual experts
    and pruning keep the planner's plan, the on-demand caches the even split of as many experts
    (an LRU cache does best with the same slots in every layer; a layer of one slot under top-2
    routing would miss on nearly every token)."""
    if experts is None:
        return [Setup("original")]
    f = plan.update_frequency if plan else 4
    cache = even or experts
    return [Setup("virtual experts", experts, MG, f), Setup("pruning", experts, MG, 0),
            Setup("on-demand LRU", cache, ON_DEMAND, 0), Setup("on-demand LRU + prefetch", cache, ON_DEMAND, 0,
                                                               prefetch=True)]


def measure(ctx: Context) -> dict:
    from tqdm import tqdm

    rounds = 1 if ctx.quick else 3
    rows = _lm_rows(ctx, {"original": Setup("original")}, 1.0, rounds)
    for s in tqdm(shares(ctx), desc="budgets: language model", unit="budget", file=sys.stderr):
        plan = planned.plan(s)
        rows += _lm_rows(ctx, {x.name: x for x in setups(plan, plan.experts_per_layer, planned.even_split(s))}, s,
                         rounds)
    switch = []
    for s in tqdm((None, *shares(ctx)), desc="budgets: summarizer", unit="budget", file=sys.stderr):
        for setup in setups(None, None if s is None else _even(ctx, s)):
            if setup.prefetch or setup.strategy is ON_DEMAND and s is not None and s < 1:
                continue  # exact: the original's Rouge-2 (its speed is the language model's story)
            subject = Subject(setup, ctx.switch, ctx.store_root)
            try:
                switch.append(dict(method=setup.name, share=1.0 if s is None else s,
                                   rouge2=measure_rouge2(subject, ctx.switch_tokenizer, ctx.pairs),
                                   accounted_mib=subject.accounted_bytes() / 2**20))
            finally:
                subject.close()
    return dict(lm=rows, switch=switch, summaries=len(ctx.pairs), prompts=len(ctx.prompt_ids),
                new_tokens=ctx.sizes.new_tokens, rounds=rounds, texts={d: len(t) for d, t in ctx.texts.items()},
                text_tokens=ctx.sizes.text_tokens,
                domain_tokens={d: sum(len(t) - 1 for t in texts) for d, texts in ctx.texts.items()})


def _lm_rows(ctx: Context, methods: dict[str, Setup], s: float, rounds: int) -> list[dict]:
    """Every method of one budget, loaded together: perplexity each, then speed in interleaved rounds."""
    subjects = {}
    try:
        rows = {}
        for name, setup in methods.items():
            subject = subjects[name] = Subject(setup, ctx.lm, ctx.store_root)
            rows[name] = dict(method=name, share=s, experts_per_layer=list(setup.experts or planned.capacity()),
                              update_frequency=setup.update_frequency,
                              accounted_mib=subject.accounted_bytes() / 2**20, store_mib=_store_mib(subject),
                              perplexity={d: measure_perplexity(subject, texts) for d, texts in ctx.texts.items()})
        for name, speed in interleaved_speed(subjects, ctx.prompt_ids, ctx.sizes.new_tokens, rounds,
                                             f"budgets at {s:.0%}: speed").items():
            rows[name].update(speed)
    finally:
        for subject in subjects.values():
            subject.close()
    for name, row in rows.items():
        if not ctx.quick or name in ("original", "virtual experts"):
            row["peak_rss_mib"] = peak_rss_mib(ctx, methods[name])
    return list(rows.values())


def _store_mib(subject: Subject) -> float:
    """External memory: every expert at the checkpoint's precision, where the runtime reads them."""
    if subject.runtime is None:
        return 0.0
    return sum(l.num_experts * l.bytes_per_expert for l in subject.runtime.layout.layers) / 2**20


def _even(ctx: Context, s: float) -> tuple[int, ...]:
    from swapmoe.executor.adapters import find_moe_blocks
    from swapmoe.executor.checkpoint import load_checkpoint

    blocks = find_moe_blocks(load_checkpoint(ctx.switch, experts_implementation=None).model)
    return tuple(max(1, round(b.num_experts * s)) for b in blocks)


def peak_rss_mib(ctx: Context, setup: Setup) -> float:
    """Peak RSS of a fresh process that loads ``setup`` and generates from one prompt."""
    from benchmarks.memory import in_fresh_process

    fields = {k: (v.value if hasattr(v, "value") else v) for k, v in setup.__dict__.items()}
    code = ("import json;from pathlib import Path;from swapmoe.core.plan import Strategy;"
            "from benchmarks.paper.subjects import Setup,Subject,measure_speed;"
            "from swapmoe.executor.memory import process_peak_rss;"
            f"f=json.loads({json.dumps(fields)!r});f['strategy']=Strategy(f['strategy']);"
            "f['experts']=tuple(f['experts']) if f['experts'] else None;"
            f"s=Subject(Setup(**f),Path({str(ctx.lm)!r}),Path({str(ctx.store_root)!r}));"
            f"measure_speed(s,[{ctx.prompt_ids[0]!r}],8);print(json.dumps(dict(peak=process_peak_rss())))")
    return in_fresh_process(code, f"peak memory of {setup.name}")["peak"] / 2**20


# --- the report ---------------------------------------------------------------------------
def _pooled_ppl(results: dict, row: dict) -> float:
    """Perplexity over every domain's tokens together (each domain's log-perplexity weighted by its tokens)."""
    weights = results["domain_tokens"]
    total = sum(weights[d] for d in row["perplexity"])
    return math.exp(sum(weights[d] * math.log(p) for d, p in row["perplexity"].items()) / total)


def _original(results: dict) -> dict:
    return next(r for r in results["lm"] if r["method"] == "original")


def render(results: dict, figures) -> list[str]:
    rows, base = results["lm"], _original(results)
    domains = list(base["perplexity"])
    lines = [
        "## Memory, latency and quality across budgets (Figures 7 and 8, Table 1)",
        "",
        f"The bundled language model at budgets from one expert per layer to every expert, all methods of a "
        f"budget holding as many experts (the same bytes): virtual experts and pruning the planner's per-layer "
        f"plan for the mix of domains, the on-demand caches the even split (an LRU cache's best shape). Speed: "
        f"{results['prompts']} held-out prompts x {results['new_tokens']} greedy tokens through the serving "
        f"step, the methods of a budget warmed up and then taking turns, the median of {results['rounds']} "
        f"round(s). Perplexity (lower is better; 'all' pools every domain's tokens): held-out text "
        f"({_texts(results)}) streamed 4 tokens per pass, a layer's update turn every F tokens as in serving. "
        "Accounted: dense weights, slots and "
        "staging buffers; peak RSS: a fresh process loading the configuration and generating.",
        "",
    ]
    head = ("method", "budget", "experts per layer", "accounted MiB", "peak RSS MiB", "TTFT ms", "tokens/s",
            *[f"ppl {d}" for d in domains], "ppl all")
    lines += table(head, [(r["method"], share(r["share"]), " ".join(str(k) for k in r["experts_per_layer"]),
                           r["accounted_mib"], r.get("peak_rss_mib", "-"), r["ttft_ms"], r["tokens_per_second"],
                           *[r["perplexity"][d] for d in domains], _pooled_ppl(results, r)) for r in rows])
    lines.append(_figure(results, figures))
    lines += ["", "The Switch summarizer (Rouge-2 on held-out functions; higher is better) at the same shares "
              f"on an even split, {results['summaries']} summaries. On-demand loading is exact: it scores as the "
              "original.", ""]
    lines += table(("method", "budget", "accounted MiB", "Rouge-2"),
                   [(r["method"], share(r["share"]), r["accounted_mib"], num(r["rouge2"], 3)) for r in results["switch"]])
    lines += ["### Expert I/O per configuration (Table 2)", "",
              "External memory: the experts the store keeps for the runtime to read (the checkpoint's "
              "precision). Drawn: bytes read over decode time; peak: the most read in one token's gap over "
              "that gap.", ""]
    lines += table(("method", "budget", "external MiB", "loads/token", "MiB/token", "drawn MiB/s", "peak MiB/s",
                    "read MiB/s while loading"),
                   [(r["method"], share(r["share"]), r["store_mib"], r["loads_per_token"], r["mib_per_token"],
                     r["drawn_mib_per_s"], r["peak_drawn_mib_per_s"], r["read_mib_per_s"])
                    for r in rows if r["method"] != "original"])
    return lines


def _texts(results: dict) -> str:
    return ", ".join(f"{n} x {results['text_tokens']} tokens of {d}" for d, n in results["texts"].items())


def _figure(results: dict, figures) -> str:
    fig, axes = figures.new(3, width=4.2)
    for method in METHODS:
        rows = [r for r in results["lm"] if r["method"] == method]
        if not rows:
            continue
        mib = [r["accounted_mib"] for r in rows]
        axes[0][0].plot(mib, [r["tokens_per_second"] for r in rows], marker="o", label=method)
        axes[0][1].plot(mib, [_pooled_ppl(results, r) for r in rows], marker="o", label=method)
        axes[0][2].plot(mib, [r["ttft_ms"] for r in rows], marker="o", label=method)
    base = _original(results)
    for ax, value in zip(axes[0], (base["tokens_per_second"], _pooled_ppl(results, base), base["ttft_ms"])):
        ax.axhline(value, color="grey", linestyle="--", label="original")
        ax.set_xlabel("accounted memory (MiB)")
    axes[0][0].set_ylabel("decode tokens/s (Fig. 7)")
    axes[0][1].set_ylabel("perplexity, all domains (Fig. 8)")
    axes[0][2].set_ylabel("time to first token (ms)")
    axes[0][0].legend(fontsize=7)
    return figures.save(fig, "budgets", "Speed, quality and TTFT against memory, per method")


def claims(results: dict) -> list[tuple[str, str, str, str]]:
    lm = results["lm"]
    by = {(r["method"], r["share"]): r for r in lm}
    half = min((r["share"] for r in lm if r["method"] == "virtual experts"), key=lambda s: abs(s - 0.5))
    ve, pr, od = by[("virtual experts", half)], by[("pruning", half)], by[("on-demand LRU", half)]
    base = _original(results)
    ppl = {key: _pooled_ppl(results, r) for key, r in by.items()}
    out = [
        ("Virtual experts keep quality well above pruning at the same memory",
         "SwitchT-32 at 4.7 GB: Rouge-2 0.232, 8.76% above pruning",
         f"{share(half)} of experts: perplexity {num(ppl[('virtual experts', half)])} vs pruning "
         f"{num(ppl[('pruning', half)])} (original {num(_pooled_ppl(results, base))})",
         "yes" if ppl[("virtual experts", half)] < ppl[("pruning", half)] else "no"),
        ("Virtual experts run at about pruning's latency, far below on-demand loading",
         "Fig. 7: similar to pruning; on-demand 6.2-8.9x slower (Fig. 1)",
         f"tokens/s at {share(half)}: virtual {num(ve['tokens_per_second'])}, pruning "
         f"{num(pr['tokens_per_second'])}, on-demand {num(od['tokens_per_second'])}",
         "yes" if ve["tokens_per_second"] >= 0.8 * pr["tokens_per_second"]
         and ve["tokens_per_second"] > 1.1 * od["tokens_per_second"] else
         "partly" if ve["tokens_per_second"] >= 0.8 * pr["tokens_per_second"] else "no"),
    ]
    loss = ppl[("virtual experts", half)] / _pooled_ppl(results, base) - 1
    out.append(("Memory falls with the budget; accuracy degrades gracefully",
                "14.2 GiB -> 4.7 GiB, Rouge-2 -0.041",
                f"{num(base['accounted_mib'])} MiB -> {num(ve['accounted_mib'])} MiB at {share(half)}, perplexity "
                f"{pct(loss)} vs the original",
                "no" if ve["accounted_mib"] >= base["accounted_mib"] else "yes" if loss <= 0.1 else "partly"))
    switch = {(r["method"], r["share"]): r for r in results["switch"]}
    cut = sorted(s for m, s in switch if m == "virtual experts" and s < 1 and ("pruning", s) in switch)
    if cut:
        wins = [s for s in cut if switch[("virtual experts", s)]["rouge2"] >= switch[("pruning", s)]["rouge2"]]
        so = next(r for r in results["switch"] if r["method"] == "original")
        out.append(("Summarization: Rouge-2 drops slightly under virtual experts, more under pruning",
                    "Rouge-2 -0.012 at 37% less memory (Jetson AGX)",
                    "; ".join(f"{share(s)}: {num(switch[('virtual experts', s)]['rouge2'])} vs pruning "
                              f"{num(switch[('pruning', s)]['rouge2'])}" for s in cut)
                    + f" (original {num(so['rouge2'])}; {results['summaries']} summaries)",
                    "yes" if len(wins) == len(cut) else "partly" if 2 * len(wins) >= len(cut) else "no"))
    io = max(r["peak_drawn_mib_per_s"] for r in lm if r["method"] == "virtual experts")
    tier = max(r["read_mib_per_s"] for r in lm)
    out.append(("Virtual experts' I/O is small next to the tier's bandwidth", "peak about 20 MiB/s (Table 2)",
                f"peak {num(io)} MiB/s drawn, against the store's measured {num(tier)} MiB/s; "
                f"{num(ve['mib_per_token'])} MiB per token at {share(half)}",
                "yes" if io < 0.25 * tier else "partly" if io < tier else "no"))
    return out
