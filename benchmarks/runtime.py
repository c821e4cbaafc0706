"""Virtual experts against the original model and the baselines, side by side in one run.

    python -m benchmarks.runtime                 # both models, writes benchmarks/results/RESULTS-runtime.md
    python -m benchmarks.runtime --quick         # fewer prompts, for a smoke run

Configurations (all but "original" run in the executor's runtime, ``swapmoe.executor.virtual_experts``):
original (unmodified transformers as it loads by default, every expert), virtual experts at
100/75/50/25% of the experts (masked gating, an update every ``F`` tokens), pruning (the
top-||E_i|| experts per layer, never swapped) and on-demand (an LRU cache of the same size
that loads misses: exact); and llama.cpp on the same checkpoint as an f32 and an f16 GGUF, each
served from its own process (``benchmarks.peer_llamacpp``; skipped, with a note, when not installed).
Prompts are interleaved across configurations so drift on a shared machine hits them alike.
Peak memory is measured in a fresh process per configuration.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import peer_llamacpp
from swapmoe.core.plan import Strategy
from swapmoe.executor.checkpoint import load_checkpoint
from swapmoe.executor.requests import GenerationRequest
from swapmoe.executor.loader import LoadCounters
from swapmoe.executor.metrics import percentile
from swapmoe.executor.model_runner import ModelRunner
from swapmoe.executor.step import generate_offline
from swapmoe.executor.virtual_experts import VirtualExperts
from swapmoe.models.corpus import DOMAINS, load_eval

HERE = Path(__file__).resolve().parent
REPORT = HERE / "results" / "RESULTS-runtime.md"
BUNDLED_LM = HERE.parent / "models" / "swapmoe-lm"
UPDATE_FREQUENCY = 4
PEER_TYPES = ("f32", "f16")  # llama.cpp's GGUF types measured beside the configurations


@dataclass(frozen=True, slots=True)
class Config:
    name: str
    fraction: float = 1.0  # of each layer's experts kept in slots
    strategy: Strategy = Strategy.MASKED_GATING
    update_frequency: int = UPDATE_FREQUENCY
    original: bool = False
    background: bool | None = None  # decide updates on the updater thread (None: the runtime's default)


CONFIGS = (
    Config("original", original=True),
    Config("virtual 100%", 1.0),
    Config("virtual 75%", 0.75),
    Config("virtual 50%", 0.5),
    Config("virtual 50%, updates on a thread", 0.5, background=True),
    Config("virtual 25%", 0.25),
    Config("pruning 50% (= updates off)", 0.5, update_frequency=0),
    Config("on-demand LRU 50%", 0.5, Strategy.ON_DEMAND, update_frequency=0),
)


class Subject:
    """One configuration, loaded: a model and what runs between its forward passes."""

    def __init__(self, config: Config, checkpoint: Path, store_root: Path, bandwidth: float | None = None):
        self.config = config
        self.runtime = None
        if config.original:
            self.model = load_checkpoint(checkpoint, experts_implementation=None).model  # as transformers loads it
            return
        self.runtime = VirtualExperts(checkpoint, store_root=store_root, load_bandwidth=bandwidth, log=lambda _: None,
                                      background_updates=config.background)
        self.runtime.resize([max(1, round(l.num_experts * config.fraction)) for l in self.runtime.layout.layers])
        self.runtime.set_strategy(config.strategy)
        self.model = self.runtime.model

    def begin_input(self) -> None:
        if self.runtime:
            self.runtime.begin_input()

    def between(self) -> None:
        if self.runtime:
            self.runtime.between_passes(self.config.update_frequency)

    def io(self) -> LoadCounters:
        return self.runtime.io.snapshot() if self.runtime else LoadCounters()

    def accounted_bytes(self) -> int:
        if self.runtime is None:
            return sum(p.numel() * p.element_size() for p in self.model.parameters())
        return self.runtime.layout.dense_bytes + self.runtime.slot_bytes() + self.runtime.staging_bytes


class Peer:
    """llama.cpp serving the checkpoint as a GGUF from its own process (benchmarks.peer_llamacpp)."""

    runtime = None

    def __init__(self, outtype: str, checkpoint: Path, store_root: Path, threads: int):
        self.config = Config(f"llama.cpp {outtype}")
        # Named by the directory alone: a random model made afresh each run replaces its GGUFs (it is newer).
        self.gguf = peer_llamacpp.convert(checkpoint, store_root / "gguf" / f"{checkpoint.name}-{outtype}.gguf",
                                          outtype, threads=threads)
        self.process = peer_llamacpp.LlamaProcess(self.gguf, threads)

    def begin_input(self) -> None:
        pass

    def between(self) -> None:
        pass

    def io(self) -> LoadCounters:
        return LoadCounters()

    def accounted_bytes(self) -> int:
        return self.gguf.stat().st_size

    def close(self) -> dict:
        """Ends the process; its peak RSS, and that above its RSS once llama_cpp was imported."""
        memory = self.process.memory()
        self.process.close()
        return dict(peak_rss_mib=memory["peak_rss"] / 2**20,
                    peak_above_libraries_mib=(memory["peak_rss"] - memory["library_rss"]) / 2**20)


def generate_timed(subject: Subject | Peer, prompt: list[int], new_tokens: int) -> list[int]:
    """Token arrival times (ns), the first measured from the start of the prefill, through the
    serving step (the unmodified model's too, with no virtual experts); a peer times its own."""
    if isinstance(subject, Peer):
        return subject.process.generate(prompt, new_tokens).times_ns
    runner = ModelRunner(subject.model, subject.runtime, 1, subject.config.update_frequency)
    start = time.perf_counter_ns()
    made = generate_offline(runner, [GenerationRequest(tuple(prompt), new_tokens)])
    return [start] + [e.computed_ns for e in made]


@torch.inference_mode()
def streaming_perplexity(subject: Subject, texts: list[list[int]], chunk: int) -> float:
    """Perplexity with the resident set moving as the text streams by: ``chunk`` tokens per
    forward pass (with a KV cache), the runtime's between-pass work after each."""
    nll, count = 0.0, 0
    for ids in texts:
        subject.begin_input()
        past = None
        for start in range(0, len(ids) - 1, chunk):
            piece = torch.tensor([ids[start:start + chunk + 1]])
            inputs, targets = piece[:, :-1], piece[:, 1:]
            out = subject.model(input_ids=inputs, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logp = torch.log_softmax(out.logits.float(), dim=-1)
            nll -= logp.gather(-1, targets[..., None]).sum().item()
            count += targets.numel()
            subject.between()
    return math.exp(nll / count)


def measure_model(label: str, checkpoint: Path, prompts: list[list[int]], texts: list[list[int]] | None,
                  new_tokens: int, store_root: Path, configs=CONFIGS, bandwidth: float | None = None,
                  peers: tuple[str, ...] = (), threads: int = 1) -> list[dict]:
    subjects = [Subject(c, checkpoint, store_root, bandwidth)
                for c in tqdm(configs, desc=f"{label}: loading", unit="config")]
    subjects += [Peer(t, checkpoint, store_root, threads) for t in tqdm(peers, desc=f"{label}: GGUF", unit="type")]
    configs = [s.config for s in subjects]
    gaps = {c.name: [] for c in configs}
    ttft = {c.name: [] for c in configs}
    decode = {c.name: [0, 0] for c in configs}  # tokens, ns
    for subject in subjects:  # warm-up: one short generation each
        generate_timed(subject, prompts[0][:8], 4)
    io_before = {s.config.name: s.io() for s in subjects}
    for prompt in tqdm(prompts, desc=f"{label}: generating", unit="prompt"):
        for subject in subjects:  # interleaved: every configuration sees the same moment of the machine
            times = generate_timed(subject, prompt, new_tokens)
            name = subject.config.name
            ttft[name].append(times[1] - times[0])
            gaps[name] += [b - a for a, b in zip(times[1:], times[2:])]
            decode[name][0] += len(times) - 2
            decode[name][1] += times[-1] - times[1]
    rows = []
    for subject in subjects:
        name = subject.config.name
        since = subject.io() - io_before[name]
        loads, nbytes, seconds = since.loads, since.nbytes, since.seconds
        tokens = decode[name][0] + len(prompts)
        rows.append(dict(
            model=label, config=name,
            tokens_per_second=decode[name][0] / (decode[name][1] / 1e9),
            ttft_ms=statistics.median(ttft[name]) / 1e6,
            itl_p50_ms=percentile(gaps[name], 50) / 1e6,
            itl_p99_ms=percentile(gaps[name], 99) / 1e6,
            loads_per_token=loads / tokens,
            swap_mib_per_s=(nbytes / 2**20) / seconds if seconds else 0.0,
            accounted_mib=subject.accounted_bytes() / 2**20,
        ))
    if texts:
        ours = [s for s in subjects if isinstance(s, Subject)]  # first in rows; peers have no perplexity here
        for row, subject in zip(rows, tqdm(ours, desc=f"{label}: perplexity", unit="config")):
            row["perplexity"] = streaming_perplexity(subject, texts, chunk=UPDATE_FREQUENCY)
    tier = next(s.runtime.tier for s in subjects if s.runtime)
    for row, subject in zip(rows, subjects):
        if subject.runtime:
            subject.runtime.close()
        elif isinstance(subject, Peer):  # its own process: its peak is its own
            row.update(subject.close())
    for row in rows:
        row["tier"] = tier
    return rows


def peak_memory(checkpoint: Path, config_index: int, store_root: Path, new_tokens: int) -> dict:
    """Load one configuration in a fresh process, generate, report its peak RSS."""
    report = "from swapmoe.executor.memory import process_peak_rss as p;print(json.dumps(dict(peak=p())))"
    code = ("import json;from pathlib import Path;import benchmarks.runtime as b;"
            f"s=b.Subject(b.CONFIGS[{config_index}],Path({str(checkpoint)!r}),Path({str(store_root)!r}));"
            f"b.generate_timed(s,list(range(5,37)),{new_tokens});" + report)
    bare = f"import json;from pathlib import Path;import benchmarks.memory as m;m.import_libraries(Path({str(checkpoint)!r}));" + report
    out = {}
    for key, program in (("peak", code), ("bare", bare)):
        done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True,
                              cwd=HERE.parent, env={**os.environ, "TQDM_DISABLE": "1"})
        out[key] = json.loads(done.stdout.strip().splitlines()[-1])["peak"]
    return dict(peak_rss_mib=out["peak"] / 2**20, peak_above_libraries_mib=(out["peak"] - out["bare"]) / 2**20)


def random_mixtral(directory: Path, hidden: int, intermediate: int) -> Path:
    """A random Mixtral, 4 layers x 16 experts, of the given width (saved, then served from disk)."""
    from swapmoe.models.tiny import save_tiny_model

    return save_tiny_model("mixtral", directory, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=4, num_local_experts=16, num_attention_heads=8, num_key_value_heads=2)


def table(rows: list[dict]) -> str:
    head = ("| model | configuration | tokens/s | TTFT ms | ITL p50 ms | ITL p99 ms | perplexity | "
            "loads/token | swap MiB/s | accounted MiB | peak RSS MiB | peak above libraries MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "-"
        lines.append(f"| {r['model']} | {r['config']} | {r['tokens_per_second']:.1f} | {r['ttft_ms']:.1f} | "
                     f"{r['itl_p50_ms']:.2f} | {r['itl_p99_ms']:.2f} | {ppl} | {r['loads_per_token']:.2f} | "
                     f"{r['swap_mib_per_s']:.0f} | {r['accounted_mib']:.1f} | {_mib(r, 'peak_rss_mib')} | "
                     f"{_mib(r, 'peak_above_libraries_mib')} |")
    return "\n".join(lines)


def _mib(row: dict, key: str) -> str:
    return f"{row[key]:.0f}" if key in row else "-"


def goals(rows: list[dict]) -> list[str]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["config"]: r for r in rows if r["model"] == model}
        full = by["virtual 100%"]["tokens_per_second"] / by["original"]["tokens_per_second"]
        vs_demand = by["virtual 50%"]["tokens_per_second"] / by["on-demand LRU 50%"]["tokens_per_second"]
        itl = by["virtual 50%"]["itl_p99_ms"] / by["pruning 50% (= updates off)"]["itl_p99_ms"]
        line = (f"- **{model}**: virtual 100% runs at {full:.2f}x the original's tokens/s (goal >= 0.95); "
                f"virtual 50% at {vs_demand:.2f}x on-demand's (goal >= 3); p99 inter-token latency with updates "
                f"on is {itl:.2f}x that with updates off (goal <= 1.2)")
        if "perplexity" in by["virtual 50%"]:
            line += (f"; perplexity at 50%: virtual {by['virtual 50%']['perplexity']:.2f}, pruning "
                     f"{by['pruning 50% (= updates off)']['perplexity']:.2f}, on-demand (exact) "
                     f"{by['on-demand LRU 50%']['perplexity']:.2f}")
        out.append(line + ".")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 prompts, 16 tokens, no memory probes, no wide model")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1),
                        help="torch threads (default: as the executor, all cores but one, left to loads)")
    parser.add_argument("--slow-tier", type=float, default=200,
                        help="also run the wide model with expert reads capped at this many MiB/s (0: skip)")
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens = 3, 16
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix="swapmoe-bench-"))
    store_root = Path(os.environ.get("SWAPMOE_BENCH_STORES", HERE.parent / ".bench-stores"))
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_LM)
    held = [r["text"] for d in DOMAINS for r in load_eval(d)[:max(1, args.prompts // len(DOMAINS) + 1)]]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in held]
    prompts = [ids[:48] for ids in encoded][:args.prompts]
    texts = [ids[:192] for ids in encoded]
    synthetic = [[5 + (i * 7 + j) % 250 for j in range(48)] for i in range(args.prompts)]
    peer_note = peer_llamacpp.available()
    peers = () if peer_note else PEER_TYPES
    models = [("tiny Mixtral 4x16, 1.5 MiB experts (random)", random_mixtral(work / "tiny", 256, 512), synthetic, None),
              ("swapmoe-lm 6x16, 192 KiB experts (bundled)", BUNDLED_LM, prompts, texts)]
    if not args.quick:
        models.append(("wide Mixtral 4x16, 24 MiB experts (random)", random_mixtral(work / "wide", 1024, 2048),
                       synthetic[:max(2, args.prompts // 2)], None))
    rows = []
    for label, path, model_prompts, model_texts in models:
        rows += measure_model(label, path, model_prompts, model_texts, args.new_tokens, store_root,
                              peers=peers, threads=args.threads)
        if not args.quick:
            for index, row in enumerate(tqdm([r for r in rows if r["model"] == label and "peak_rss_mib" not in r],
                                             desc=f"{label}: peak memory", unit="config")):
                row.update(peak_memory(path, index, store_root, 16))
    slow = []
    if args.slow_tier and not args.quick:  # the paper's regime: loads slow next to compute (an edge device's flash, PCIe to a GPU)
        label = f"wide Mixtral, tier capped at {args.slow_tier} MiB/s"
        picked = [c for c in CONFIGS if c.name in ("virtual 50%", "pruning 50% (= updates off)", "on-demand LRU 50%")]
        slow = measure_model(label, models[-1][1], synthetic[:max(2, args.prompts // 4)], None, args.new_tokens,
                             store_root, picked, args.slow_tier * 2**20)
    report = render(rows, slow, args, peer_note)
    print(report)
    args.report.write_text(report)
    args.report.with_suffix(".json").write_text(json.dumps(rows + slow, indent=1))
    print(f"wrote {args.report}")


def render(rows: list[dict], slow: list[dict], args, peer_note: str = "") -> str:
    return "\n".join([
        "# Runtime benchmark: virtual experts vs. original, pruning and on-demand",
        "",
        f"`python -m benchmarks.runtime` on {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} threads; {args.prompts} prompts x {args.new_tokens} new tokens (greedy), "
        f"configurations interleaved per prompt. Update frequency F = {UPDATE_FREQUENCY} tokens, "
        "one expert per layer per update, layers taking turns between passes. Swap tier: " + rows[0]["tier"] + ".",
        "",
        table(rows),
        "",
        "Tokens/s counts decode steps (after the first token); TTFT is the median time to the first token "
        "(prefill). Perplexity streams each held-out text (3 domains) through the runtime "
        f"{UPDATE_FREQUENCY} tokens per forward pass, updates between passes. Swap MiB/s is bytes read / time "
        "spent reading. Accounted = dense + slots + staging buffers (the original: all parameters). "
        "Peak RSS is measured in a fresh process per configuration; 'above libraries' subtracts the peak of "
        "a process that only imports torch, transformers, the runtime and the model's transformers modeling "
        "module, and warms torch up (`benchmarks.memory.import_libraries`; RESULTS-memory.md explains the "
        "rest).",
        "",
        peer_note or (f"llama.cpp rows: llama-cpp-python {peer_llamacpp.installed_version()}, the checkpoint "
                      f"converted by llama.cpp's convert_hf_to_gguf.py, {args.threads} threads, one process per "
                      "type serving the same prompts in turn; accounted = the GGUF's size; peak RSS is that "
                      "process's (mostly the mapped GGUF), 'above libraries' subtracts its RSS once llama_cpp "
                      "was imported."),
        "",
        "## Against the goals",
        "",
        *goals(rows),
        "",
        *(slow_tier_section(slow) if slow else []),
    ])


def slow_tier_section(rows: list[dict]) -> list[str]:
    by = {r["config"]: r for r in rows}
    ratio = by["virtual 50%"]["tokens_per_second"] / by["on-demand LRU 50%"]["tokens_per_second"]
    return [
        "## A slower tier",
        "",
        "The disk here reads experts at over 2 GiB/s, faster than a token's compute needs them. "
        f"The same wide model with expert reads capped at {rows[0]['model'].split('capped at ')[1]} "
        "(`ExpertStore(bandwidth=...)`, the executor's `--load-bandwidth`; an edge device's flash is in this range), "
        "measured side by side in the same run:",
        "",
        table(rows),
        "",
        f"- Virtual experts at 50% run at {ratio:.2f}x on-demand's tokens/s (goal >= 3): background loads "
        "never block a token, while on-demand waits for every miss.",
        "",
    ]


if __name__ == "__main__":
    main()
