"""Ablations (paper section 4.5, Fig. 10): SwapMoE at the planner's plan with one component
replaced at a time, quality (perplexity over every domain's held-out texts) and latency (greedy
decode through the serving step) of each, at two budgets.

Components: the importance the resident sets move toward (Eq. 1; token counts; random), amortized
loading (one load per layer update) against replacing all at once, each with asynchronous and with
synchronous (awaited) loads, the decay of importance per update, and the planner's plan against the even
split (the paper's "simple planning"); plus the paper's "simple scheduling" (token counts, every
load of an update at once, awaited: Fig. 6 (i)). Every variant reads its experts from a slow tier
(the store capped at ``BANDWIDTH``) so that loads cost time, as on the paper's Jetson.
"""

from __future__ import annotations

import sys

from benchmarks.paper import planned
from benchmarks.paper.context import Context
from benchmarks.paper.figures import Figures
from benchmarks.paper.subjects import Setup, Subject, interleaved_speed, measure_perplexity
from benchmarks.paper.tables import num, ratio, share, table

MiB = 2**20
BANDWIDTH = 50 * MiB  # bytes/s: an expert of the bundled LM (0.19 MiB) takes ~4 ms, about half a decode pass
BASE = "swapmoe"

# key: (the row's label, a short name for the figure); the changes to SwapMoE's setup are in ``_setup``.
VARIANTS = {
    BASE: ("SwapMoE", "SwapMoE"),
    "count": ("importance: token counts", "counts"),
    "random": ("importance: random", "random"),
    "replace_all": ("loading: all at once", "replace all"),
    "synchronous": ("loads: synchronous (awaited)", "sync loads"),
    "sync_all": ("loads: all at once, awaited", "sync all-at-once"),
    "decay_low": ("decay: none", "decay none"),
    "decay_high": ("decay: heavy", "decay heavy"),
    "even": ("planning: even split ('simple planning')", "even split"),
    "simple_scheduling": ("'simple scheduling': token counts, all at once, awaited", "simple sched."),
}
DECAYS = {"decay_low": 0.0, "decay_high": 0.9}
# The rows of the table: one component at a time, SwapMoE's own choice first.
GROUPS = (
    ("importance", (BASE, "count", "random")),
    ("loads", (BASE, "replace_all", "synchronous", "sync_all")),  # amortized or not x asynchronous or not
    ("decay", ("decay_low", BASE, "decay_high")),
    ("planning", (BASE, "even")),
    ("scheduling", (BASE, "simple_scheduling")),
)


def _setup(key: str, base: Setup, even: tuple[int, ...], replace_all: int) -> Setup:
    if key == "count":
        return base.at(name=key, importance="count")
    if key == "random":
        return base.at(name=key, importance="random")
    if key == "replace_all":
        return base.at(name=key, loads_per_update=replace_all)
    if key == "synchronous":
        return base.at(name=key, synchronous=True)
    if key == "sync_all":
        return base.at(name=key, loads_per_update=replace_all, synchronous=True)
    if key in DECAYS:
        return base.at(name=key, decay=DECAYS[key])
    if key == "even":
        return base.at(name=key, experts=even)
    if key == "simple_scheduling":
        return base.at(name=key, importance="count", loads_per_update=replace_all, synchronous=True)
    return base


def _knobs(s: Setup) -> dict:
    return dict(experts=list(s.experts or ()), importance=s.importance, loads_per_update=s.loads_per_update,
                synchronous=s.synchronous, decay=s.decay, update_frequency=s.update_frequency)


def measure(ctx: Context) -> dict:
    """Perplexity of each variant, then its speed in ``rounds`` rounds that take the variants in
    turn (so load from elsewhere on the machine falls on all of them alike), the median kept."""
    shares = (0.25,) if ctx.quick else (0.25, 0.5)
    rounds = 3  # cheap next to perplexity, and the machine is shared: a median of three
    texts = [ids for domain in ctx.texts.values() for ids in domain]
    replace_all = max(planned.capacity())
    full = Subject(Setup("full"), ctx.lm, ctx.store_root)
    try:
        speed = interleaved_speed({"full": full}, ctx.prompt_ids, ctx.sizes.new_tokens, rounds)["full"]
        reference = dict(perplexity=measure_perplexity(full, texts), speed=speed)
    finally:
        full.close()
    budgets = []
    for fraction in shares:
        plan = planned.plan(fraction)
        base = Setup(BASE, experts=plan.experts_per_layer, update_frequency=plan.update_frequency,
                     bandwidth=BANDWIDTH)
        even = planned.even_split(fraction)
        setups = {key: _setup(key, base, even, replace_all) for key in VARIANTS}
        subjects: dict[str, Subject] = {}
        try:
            variants = {}
            for key in _progress(setups, f"ablations at {fraction:.0%}: perplexity"):
                subjects[key] = Subject(setups[key], ctx.lm, ctx.store_root)
                variants[key] = dict(knobs=_knobs(setups[key]), perplexity=measure_perplexity(subjects[key], texts))
            for key, speed in interleaved_speed(subjects, ctx.prompt_ids, ctx.sizes.new_tokens, rounds,
                                                 f"ablations at {fraction:.0%}: speed").items():
                variants[key]["speed"] = speed
        finally:
            for subject in subjects.values():
                subject.close()
        budgets.append(dict(share=fraction, plan=plan.to_json(), even=list(even), variants=variants))
    return dict(bandwidth_mib_s=BANDWIDTH / MiB, texts=len(texts), text_tokens=sum(len(t) for t in texts),
                prompts=len(ctx.prompt_ids), new_tokens=ctx.sizes.new_tokens, rounds=rounds, reference=reference,
                budgets=budgets)


def _progress(items, desc: str):
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="variant", file=sys.stderr)


# --- rendering -----------------------------------------------------------------------------------

def _label(key: str, v: dict) -> str:
    if key in DECAYS:
        return f"decay: {v['knobs']['decay']:.1f} per update"
    if key in ("replace_all", "synchronous", "sync_all"):
        return _loads(v["knobs"])
    return VARIANTS.get(key, (key,))[0]


def _loads(k: dict) -> str:
    return f"loads: up to {k['loads_per_update']:.0f} per update, {'awaited' if k['synchronous'] else 'asynchronous'}"


def _rows(budget: dict, reference: dict) -> list[list[object]]:
    variants = budget["variants"]
    base = variants[BASE]
    rows = []
    for group, keys in GROUPS:
        for key in keys:
            if key not in variants:
                continue
            v = variants[key]
            s = v["speed"]
            label = _label(key, v) if key != BASE else f"SwapMoE ({_own(group, v)})"
            versus = ratio(v["perplexity"], base["perplexity"]) if key != BASE else "-"
            rows.append([label, v["perplexity"], versus,
                         ratio(v["perplexity"], reference["perplexity"]), s["tokens_per_second"],
                         s["itl_p50_ms"], s["itl_max_ms"], f"{s['loads_per_token']:.3g}"])
    return rows


def _own(group: str, v: dict) -> str:
    k = v["knobs"]
    return {"importance": "importance: Eq. 1", "loads": _loads(k), "decay": f"decay: {k['decay']:.1f} per update",
            "planning": "planning: the planner's", "scheduling": "Eq. 1, amortized, asynchronous"}.get(group, group)


HEAD = ("variant", "perplexity", "vs SwapMoE", "vs full model", "tokens/s", "ITL p50 ms", "ITL max ms",
        "loads/token")


def render(results: dict, figures: Figures) -> list[str]:
    ref = results["reference"]
    lines = [
        "## Ablations (paper section 4.5, Fig. 10)",
        "",
        f"SwapMoE on the bundled LM at the planner's plan, with one component replaced at a time; each variant "
        f"scored for perplexity over {results['texts']:.0f} held-out texts, every domain's together "
        f"({results['text_tokens']:.0f} tokens, 4 per forward pass with its update turn after each, as serving decodes) "
        f"and timed on {results['prompts']:.0f} prompts x {results['new_tokens']:.0f} greedy tokens through the "
        f"serving step (the median of {results['rounds']:.0f} round(s) that take the variants in turn). Experts load from the store capped at {results['bandwidth_mib_s']:.0f} MiB/s, so loads "
        f"cost time as on the paper's Jetson. The full model (every expert resident): perplexity "
        f"{num(ref['perplexity'])}, {num(ref['speed']['tokens_per_second'])} tokens/s, max inter-token gap "
        f"{num(ref['speed']['itl_max_ms'])} ms.",
        "",
    ]
    for b in results["budgets"]:
        plan = b["plan"]
        lines += [f"### Budget {share(b['share'])} of all experts",
                  "",
                  f"The planner's plan: {', '.join(f'{e:.0f}' for e in plan['experts_per_layer'])} experts per layer "
                  f"(the even split: {', '.join(f'{e:.0f}' for e in b['even'])}), a layer's update every "
                  f"{plan['update_frequency']:.0f} passes. \"vs\" columns: perplexity ratios.",
                  "",
                  *table(HEAD, _rows(b, ref))]
    lines += [_figure(results, figures), ""]
    lines += _findings(results)
    return lines


def _bars(results: dict) -> list[tuple[str, str]]:
    """The variants in the figure, with short names."""
    present = set().union(*(b["variants"] for b in results["budgets"])) if results["budgets"] else set()
    return [(k, VARIANTS[k][1]) for k in VARIANTS if k in present]


def _figure(results: dict, figures: Figures) -> str:
    fig, axes = figures.new(3, width=5.2, height=3.8)
    bars = _bars(results)
    budgets = results["budgets"]
    ref = results["reference"]
    width = 0.8 / max(1, len(budgets))
    metrics = ((lambda v, b: v["perplexity"] / b[BASE]["perplexity"], "perplexity / SwapMoE's (log; lower is better)",
                None),
               (lambda v, b: v["speed"]["tokens_per_second"], "decode tokens/s", ref["speed"]["tokens_per_second"]),
               (lambda v, b: v["speed"]["itl_max_ms"], "max inter-token gap, ms", ref["speed"]["itl_max_ms"]))
    for ax, (get, title, full) in zip(axes[0], metrics):
        for n, b in enumerate(budgets):
            xs = [i + (n - (len(budgets) - 1) / 2) * width for i in range(len(bars))]
            ys = [get(b["variants"][k], b["variants"]) if k in b["variants"] else float("nan") for k, _ in bars]
            if full is None:  # ratios: bars up or down from 1
                ax.bar(xs, [y - 1 for y in ys], width, bottom=1, label=f"budget {share(b['share'])}")
            else:
                ax.bar(xs, ys, width, label=f"budget {share(b['share'])}")
        if full is None:
            from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullLocator
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(FixedLocator([0.9, 1, 1.1, 1.25, 1.5, 2, 3, 5, 10]))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
            ax.yaxis.set_minor_locator(NullLocator())
            ax.axhline(1, color="k", linewidth=0.8)
        else:
            ax.axhline(full, color="k", linestyle="--", linewidth=1, label="full model")
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels([name for _, name in bars], rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    return figures.save(fig, "ablations", "Ablations: perplexity against SwapMoE's, decode speed and worst "
                                          "inter-token gap per variant")


def _findings(results: dict) -> list[str]:
    out = []
    for b in results["budgets"]:
        v = b["variants"]
        base = v[BASE]["perplexity"]
        names = lambda keys: ", ".join(VARIANTS.get(k, (k, k))[1] for k in keys) or "none"  # noqa: E731
        worse = [k for k in v if k != BASE and v[k]["perplexity"] > base * 1.005]
        better = [k for k in v if k != BASE and v[k]["perplexity"] < base / 1.005]
        line = (f"At {share(b['share'])}, against SwapMoE's perplexity {num(base)}: {len(worse):.0f} of "
                f"{len(v) - 1:.0f} variants are worse by over 0.5% (worst: {num(max(v[k]['perplexity'] for k in v))}), "
                f"better by over 0.5%: {names(better)}; the rest within 0.5%")
        if {"synchronous", "sync_all"} <= set(v):
            line += (f". With loads awaited, replacing all at once takes the worst gap from "
                     f"{num(v['synchronous']['speed']['itl_max_ms'])} to {num(v['sync_all']['speed']['itl_max_ms'])} ms; "
                     f"asynchronous, from {num(v[BASE]['speed']['itl_max_ms'])} to "
                     f"{num(v['replace_all']['speed']['itl_max_ms'])} ms")
        out.append(line + ".")
    return out + [""]


# --- claims --------------------------------------------------------------------------------------

def _verdict(flags: list[bool]) -> str:
    return "yes" if flags and all(flags) else "partly" if any(flags) else "no"


def _compare(results: dict, key: str, metric, lower_better: bool = True, against: str = BASE):
    """Per budget: (``against``'s value, the variant's, whether ``against``'s is better)."""
    out = []
    for b in results["budgets"]:
        v = b["variants"]
        if key in v and against in v:
            mine, theirs = metric(v[against]), metric(v[key])
            out.append((b["share"], mine, theirs, mine < theirs if lower_better else mine > theirs))
    return out


def _claim(results, key, metric, claim, paper, unit="perplexity", lower_better=True, against=BASE):
    rows = _compare(results, key, metric, lower_better, against)
    measured = "; ".join(f"{share(s)}: {num(a)} vs {num(b)}" for s, a, b, _ in rows)
    return (claim, paper, f"{unit} {measured}" if rows else "-", _verdict([r[3] for r in rows]))


def claims(results: dict) -> list[tuple[str, str, str, str]]:
    ppl = lambda v: v["perplexity"]  # noqa: E731
    gap = lambda v: v["speed"]["itl_max_ms"]  # noqa: E731
    rate = lambda v: v["speed"]["tokens_per_second"]  # noqa: E731
    paper_all = "Fig. 10: \"the absence of any component in SwapMoE leads to performance degradation\""
    out = [
        _claim(results, "count", ppl, "Importance by Eq. 1 beats importance by token counts",
               "Fig. 10: SwapMoE's perplexity better than 'simple scheduling' (token counts); no numbers in the text"),
        _claim(results, "random", ppl, "Importance by Eq. 1 beats a randomly moving resident set", paper_all),
        _claim(results, "simple_scheduling", ppl, "SwapMoE beats 'simple scheduling' (counts, no amortized updates)",
               "Fig. 10 (1): perplexity better than 'simple scheduling'"),
        _claim(results, "sync_all", gap, "Amortized loading keeps the worst inter-token gap below replacing all at "
               "once (loads awaited)", "Sec. 3.2 / Fig. 6: amortized loading introduced \"to reduce overhead\"",
               unit="max gap ms, amortized vs all at once", against="synchronous"),
        _claim(results, "replace_all", gap, "... and with asynchronous loads", "Sec. 3.2 / Fig. 6 (ii)",
               unit="max gap ms, amortized vs all at once"),
        _claim(results, "synchronous", rate, "Asynchronous loads decode faster than synchronous ones",
               "Sec. 3.2 / Fig. 6 (ii): asynchronous loading hides load time",
               unit="tokens/s, asynchronous vs awaited", lower_better=False),
        _claim(results, "even", ppl, "The planner's plan beats the even split ('simple planning')",
               "Fig. 10 (2): perplexity better than 'simple planning'"),
    ]
    keys = ("decay_low", BASE, "decay_high")
    decays = [(b["share"], {b["variants"][k]["knobs"]["decay"]: b["variants"][k]["perplexity"]
                            for k in keys if k in b["variants"]}) for b in results["budgets"]]
    measured = "; ".join(f"{share(s)}: " + ", ".join(f"decay {d:.2f}: {num(p)}" for d, p in ds.items())
                         for s, ds in decays)
    flags = [list(ds.values()).index(min(ds.values())) == len(ds) // 2 for _, ds in decays if len(ds) == 3]
    out.append(("(not in the paper) Decaying importance by half per update does best of none / half / 0.9",
                "-", f"perplexity {measured}", _verdict(flags)))
    return out

