"""Measure the bundled checkpoints and write their model cards.

    python -m swapmoe.models.evaluate lm        # perplexity per domain + routing statistics -> swapmoe-lm/README.md
    python -m swapmoe.models.evaluate switch    # Rouge-2 vs a trivial baseline + routing -> swapmoe-switch/README.md

Everything is computed on the held-out sets shipped in ``models/data/eval``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from swapmoe.executor.adapters import adapter_for, find_moe_blocks
from swapmoe.models import routing_stats as rs
from swapmoe.models import cards
from swapmoe.models.bundled import LM_DIR, SWITCH_DIR
from swapmoe.models.corpus import DOMAINS, extra_summary_pairs, load_eval, name_baseline, summary_pairs
from swapmoe.models.summarization import rouge2, rouge2_scores, source_ids, source_losses, summarize

WINDOW = 256


class RoutingRecorder:
    """Records each MoE layer's chosen experts [tokens, k] on every forward pass."""

    def __init__(self, model):
        adapter = adapter_for(model)
        self.blocks = find_moe_blocks(model)
        self.calls: list[list[np.ndarray]] = [[] for _ in self.blocks]
        for n, block in enumerate(self.blocks):
            router = getattr(block.module, adapter.router_attr)
            router.register_forward_hook(lambda _m, _i, out, n=n: self.calls[n].append(_choices(out)))

    def take(self) -> list[np.ndarray]:
        """Choices per layer since the last call."""
        out = [np.concatenate(c) if c else np.zeros((0, 1), dtype=int) for c in self.calls]
        for c in self.calls:
            c.clear()
        return out


def _choices(out) -> np.ndarray:
    first = out[0]
    if first.dim() == 3 and first.shape[-1] == out[2].shape[-1]:  # Switch: one-hot dispatch [B, S, E]
        return out[2].reshape(-1, out[2].shape[-1]).argmax(-1, keepdim=True).numpy()
    return out[2].reshape(-1, out[2].shape[-1]).numpy()  # (logits, weights, index [T, k])


def load(path: Path, seq2seq: bool = False):
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = auto.from_pretrained(path, local_files_only=True, experts_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


@torch.inference_mode()
def perplexity_and_routing(model, tokenizer, texts: list[str], recorder: RoutingRecorder):
    """Token-weighted perplexity over non-overlapping windows, and each text's routing per layer."""
    nll, count, per_text = 0.0, 0, []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        for start in range(0, len(ids), WINDOW):
            window = ids[start:start + WINDOW][None]
            n = window.shape[1] - 1  # predicted tokens (transformers shifts the labels)
            if n < 1:
                continue
            loss = model(input_ids=window, labels=window).loss
            nll, count = nll + loss.item() * n, count + n
        per_text.append(recorder.take())
    return math.exp(nll / count), per_text


def routing_summary(per_input: dict[str, list[list[np.ndarray]]], num_experts: int) -> dict:
    """The premise statistics, averaged over layers. ``per_input[domain][input][layer]`` = choices."""
    layers = len(next(iter(per_input.values()))[0])
    out = defaultdict(list)
    for layer in range(layers):
        domain_usage = {}
        usages_by_domain = {}
        for domain, inputs in per_input.items():
            choices = [inp[layer] for inp in inputs if len(inp[layer])]
            domain_usage[domain] = rs.usage(np.concatenate(choices), num_experts)
            usages_by_domain[domain] = [rs.usage(c, num_experts) for c in choices]
            out["repeat_rate"].append(np.mean([rs.repeat_rate(c, num_experts) for c in choices]))
            out["repeat_chance"].append(np.mean([rs.chance_repeat_rate(np.concatenate(choices), num_experts)]))
            out["doc_top25_share"] += [rs.top_share(u) for u in usages_by_domain[domain]]
            out["doc_effective_experts"] += [rs.effective_experts(u) for u in usages_by_domain[domain]]
            out["next_input_similarity"].append(rs.consecutive_input_similarity(usages_by_domain[domain]))
        everything = np.mean(list(domain_usage.values()), axis=0)
        out["corpus_top25_share"].append(rs.top_share(everything))
        out["corpus_effective_experts"].append(rs.effective_experts(everything))
        pool = [u for us in usages_by_domain.values() for u in us]
        out["random_input_similarity"].append(rs.random_pair_similarity(pool, seed=layer))
        names = sorted(domain_usage)
        out["domain_js_divergence"] += [rs.jensen_shannon(domain_usage[a], domain_usage[b])
                                        for i, a in enumerate(names) for b in names[i + 1:]]
        if layer == layers // 2:
            out["middle_layer_top_experts"] = {d: [int(e) for e in np.argsort(u)[::-1][:3]]
                                               for d, u in domain_usage.items()}
            out["middle_layer_usage"] = {d: [round(float(x), 4) for x in u] for d, u in domain_usage.items()}
    return {k: (float(np.mean(v)) if isinstance(v, list) and v and not isinstance(v[0], list) else v)
            for k, v in out.items()}


def evaluate_lm(path: Path = LM_DIR) -> dict:
    model, tokenizer = load(path)
    recorder = RoutingRecorder(model)
    started = time.monotonic()
    perplexity, routing = {}, {}
    for domain in DOMAINS:
        rows = load_eval(domain)
        perplexity[domain], routing[domain] = perplexity_and_routing(model, tokenizer, [r["text"] for r in rows],
                                                                     recorder)
    return dict(
        perplexity=perplexity,
        uniform_perplexity=len(tokenizer),
        eval_texts={d: len(load_eval(d)) for d in DOMAINS},
        routing=routing_summary(routing, recorder.blocks[0].num_experts),
        untrained_routing=untrained_routing(model, tokenizer),
        parameters=sum(p.numel() for p in model.parameters()),
        seconds=round(time.monotonic() - started, 1),
    )


def untrained_routing(model, tokenizer) -> dict:
    """The same statistics for a randomly initialized model of the same configuration: the
    control that separates what training taught the routers from what token statistics alone give."""
    torch.manual_seed(0)
    control = type(model)(model.config).eval()
    recorder = RoutingRecorder(control)
    routing = {d: perplexity_and_routing(control, tokenizer, [r["text"] for r in load_eval(d)], recorder)[1]
               for d in DOMAINS}
    return routing_summary(routing, recorder.blocks[0].num_experts)


def paired_bootstrap(ours: np.ndarray, theirs: np.ndarray, samples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(ours - theirs) over resampled pairs."""
    rng = np.random.default_rng(seed)
    gaps = (ours - theirs)[rng.integers(0, len(ours), (samples, len(ours)))].mean(1)
    return float(np.quantile(gaps, 0.025)), float(np.quantile(gaps, 0.975))


def retrieval_summaries(train: list, bodies: list[str]) -> list[str]:
    """A non-neural reference: the summary of the training function whose code is most similar
    (cosine of sublinear TF-IDF vectors over the code's lower-case words)."""
    def terms(code: str) -> Counter:
        return Counter(re.findall(r"[a-z]+", code.lower().replace("_", " ")))

    docs = [terms(p.body) for p in train]
    df = Counter(t for d in docs for t in d)
    idf = {t: math.log((1 + len(docs)) / (1 + n)) + 1 for t, n in df.items()}

    def vector(counts: Counter) -> dict[str, float]:
        v = {t: (1 + math.log(c)) * idf[t] for t, c in counts.items() if t in idf}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {t: x / norm for t, x in v.items()}

    postings = defaultdict(list)
    for i, d in enumerate(docs):
        for t, x in vector(d).items():
            postings[t].append((i, x))
    out = []
    for body in bodies:
        scores = defaultdict(float)
        for t, x in vector(terms(body)).items():
            for i, y in postings[t]:
                scores[i] += x * y
        out.append(train[max(scores, key=scores.get)].summary if scores else "")
    return out


def evaluate_switch(path: Path = SWITCH_DIR) -> dict:
    model, tokenizer = load(path, seq2seq=True)
    recorder = RoutingRecorder(model)
    pairs = load_eval("summarization")
    started = time.monotonic()
    predictions = summarize(model, tokenizer, [p["body"] for p in pairs])
    recorder.take()
    per_input = []
    with torch.inference_mode():  # encoder routing per input, for the premise statistics
        for p in pairs:
            model.get_encoder()(input_ids=torch.tensor([source_ids(tokenizer, p["body"])]))
            per_input.append(recorder.take()[:len(_encoder_blocks(recorder))])
    references = [p["summary"] for p in pairs]
    own, other = source_losses(model, tokenizer, [p["body"] for p in pairs], references)
    ours = rouge2_scores(predictions, references)
    baseline = rouge2_scores([name_baseline(p["name"]) for p in pairs], references)
    train, held_out = summary_pairs()  # the summarizer's training pairs, for the retrieval reference
    retrieved = retrieval_summaries(train + extra_summary_pairs(held_out), [p["body"] for p in pairs])
    return dict(
        rouge2=float(ours.mean()),
        baseline_rouge2=float(baseline.mean()),
        gap_95ci=paired_bootstrap(ours, baseline),
        loss_own_source=own,
        loss_other_source=other,
        retrieval_rouge2=rouge2(retrieved, references),
        pairs=len(pairs),
        examples=[dict(name=p["name"], reference=r, prediction=q)
                  for p, r, q in list(zip(pairs, references, predictions))[:8]],
        routing=routing_summary({"code": per_input}, recorder.blocks[0].num_experts),
        parameters=sum(p.numel() for p in model.parameters()),
        seconds=round(time.monotonic() - started, 1),
    )


def _encoder_blocks(recorder: RoutingRecorder) -> list:
    return [b for b in recorder.blocks if b.name.startswith("encoder.")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["lm", "switch"])
    parser.add_argument("--no-card", action="store_true", help="print the figures, do not rewrite the card")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    results = evaluate_lm() if args.model == "lm" else evaluate_switch()
    print(json.dumps(results, indent=2))
    if not args.no_card:
        path = cards.write(args.model, results)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
