"""Peak process memory above the libraries against the bytes the executor accounts, per model
and batch size.

    python -m benchmarks.memory            # writes benchmarks/results/RESULTS-memory.md (about 3 min)

Each (model, rows) runs in a fresh process: import the libraries (torch, transformers, the
executor, and the model's own transformers modeling module, which transformers imports lazily
the first time a model class is used), warm torch up with a few small ops, then build the
executor's engine (budget: the whole model), run one short generation, then ``rows``
generations at once with prompts that fill the context window. Peak RSS (VmHWM) at each stage,
minus the libraries' RSS, is what the executor itself made; the engine's ``MemoryReport`` at
that batch is what it accounts against its budget.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPORT = HERE / "results" / "RESULTS-memory.md"
BUNDLED_LM = HERE.parent / "models" / "swapmoe-lm"
ROWS = (1, 4, 16)
MiB = 2**20


def import_libraries(model_dir: Path) -> None:
    """What any process serving ``model_dir`` loads whatever its budget: the executor's libraries,
    the model's transformers modeling module (imported lazily, on a model class's first use) and
    torch's kernels warmed up."""
    import torch
    import transformers

    importlib.import_module("swapmoe.executor.engine")

    config = transformers.AutoConfig.from_pretrained(model_dir)
    auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    auto._model_mapping[type(config)]  # imports the modeling module
    x = torch.randn(64, 64)
    torch.topk(torch.nn.functional.silu(x @ x).softmax(-1), 2)


def probe(model_dir: Path, rows: int, store_root: Path) -> dict:
    """In this (fresh) process: peak RSS at each stage and the accounted bytes at ``rows``."""
    from swapmoe.executor.memory import process_peak_rss

    stages = {"python": process_peak_rss()}
    for name in ("torch", "transformers"):  # the libraries themselves, measured
        importlib.import_module(name)
    from swapmoe.executor.engine import Engine, EngineConfig
    from swapmoe.executor.requests import GenerationRequest

    stages["torch, transformers, executor"] = process_peak_rss()
    import_libraries(model_dir)
    stages["libraries"] = process_peak_rss()
    engine = Engine(EngineConfig(model_dir, 8 << 30, max_batch=rows, store_root=store_root, threads=1))
    stages["engine built"] = process_peak_rss()
    list(engine.generate(GenerationRequest(tuple(range(5, 37)), 4)))
    stages["one short generation"] = process_peak_rss()
    vocab = engine.layout.vocab_size or 256
    prompt = tuple(5 + i % (vocab - 5) for i in range(engine.max_context - 8))
    workers = [threading.Thread(target=lambda: list(engine.generate(GenerationRequest(prompt, 8))))
               for _ in range(rows)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stages["full batch at full context"] = process_peak_rss()
    report = engine.memory()
    engine.close()
    return dict(stages=stages, context=engine.max_context, rows=engine.scheduler.limit,
                accounted=report.accounted_bytes, dense=report.dense_bytes, experts=report.expert_bytes,
                kv=report.kv_cache_bytes, activations=report.activation_bytes, runtime=report.runtime_bytes)


def in_fresh_process(code: str, what: str) -> dict:
    """Run ``code`` (which prints a JSON line last) in a new Python process; what it printed."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE.parent,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode:
        raise RuntimeError(f"{what}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(label: str, model_dir: Path, rows: int, store_root: Path) -> dict:
    code = (f"import json,sys;from pathlib import Path;from benchmarks.memory import probe;"
            f"print(json.dumps(probe(Path({str(model_dir)!r}),{rows},Path({str(store_root)!r}))))")
    return dict(model=label, **in_fresh_process(code, f"{label}, {rows} rows"))


def table(results: list[dict]) -> str:
    head = ("| model | rows | context | libraries MiB (of which the model's modeling module) | engine built | "
            "peak above libraries | accounted (dense + experts & staging + KV + activations + runtime) | "
            "peak / accounted |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        s = {k: v / MiB for k, v in r["stages"].items()}
        base = s["libraries"]
        peak = s["full batch at full context"] - base
        accounted = r["accounted"] / MiB
        parts = " + ".join(f"{r[k] / MiB:.1f}" for k in ("dense", "experts", "kv", "activations", "runtime"))
        lines.append(f"| {r['model']} | {r['rows']} | {r['context']} | {base:.0f} "
                     f"({base - s['torch, transformers, executor']:.0f}) | {s['engine built'] - base:.1f} | "
                     f"{peak:.1f} | {accounted:.1f} = {parts} | {peak / accounted:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS), help="batch sizes (default 1 4 16)")
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    from tqdm import tqdm

    from benchmarks.runtime import random_mixtral

    work = Path(tempfile.mkdtemp(prefix="swapmoe-memory-"))
    store_root = Path(os.environ.get("SWAPMOE_BENCH_STORES", HERE.parent / ".bench-stores"))
    models = [("tiny Mixtral 4x16, 1.5 MiB experts (random)", random_mixtral(work / "tiny", 256, 512)),
              ("swapmoe-lm 6x16, 192 KiB experts (bundled)", BUNDLED_LM),
              ("wide Mixtral 4x16, 24 MiB experts (random)", random_mixtral(work / "wide", 1024, 2048))]
    from swapmoe.executor.store_build import ensure_store

    for _, path in models:  # built once beforehand: a store build reads the checkpoint, serving does not
        ensure_store(path, store_root, log=lambda _: None)
    runs = [(label, path, rows) for label, path in models for rows in args.rows]
    results = [measure(label, path, rows, store_root) for label, path, rows in tqdm(runs, unit="process")]
    report = render(results)
    print(report)
    args.report.write_text(report)
    args.report.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.report}")


def render(results: list[dict]) -> str:
    worst = max(results, key=lambda r: (r["stages"]["full batch at full context"] - r["stages"]["libraries"])
                / r["accounted"])
    worst_ratio = ((worst["stages"]["full batch at full context"] - worst["stages"]["libraries"])
                   / worst["accounted"])
    return "\n".join([
        "# Memory: what the process holds against what the executor accounts",
        "",
        "`python -m benchmarks.memory`: each row a fresh process on x86_64, torch 1 thread, budget = the whole "
        "model (every expert resident), `rows` generations at once with prompts that fill the context window "
        "(the model's limit). Peak is VmHWM; every figure but the libraries' is above the libraries (MiB).",
        "",
        table(results),
        "",
        "## What the figures say",
        "",
        f"- **Peak above the libraries stays within the accounted bytes**: worst {worst_ratio:.2f}x "
        f"({worst['model']}, {worst['rows']} rows).",
        "- **Libraries**: torch, transformers and the executor take about 250 MiB; the model's own transformers "
        "modeling module, which transformers imports the first time a model class is used, about 115 MiB more "
        "(it pulls in transformers' generation and integration modules). The runtime report's 'peak above "
        "libraries' counted that module as the executor's: the 7x of the bundled model's accounted bytes there "
        "was mostly this library code, loaded once per process whatever the budget.",
        "- **Engine built**: dense weights and slots as accounted, plus the tokenizer, the model's and the "
        "expert store's Python objects and the loader's thread, then the first generation's allocator "
        "arenas: 13-18 MiB beyond the tensors (`executor.memory.RUNTIME_FIXED_BYTES` accounts 24 MiB).",
        "- **A full batch at full context**: each sequence's KV cache grows by one column per forward pass through "
        "a new, larger tensor per layer (transformers' DynamicCache), and the allocator keeps freed copies it "
        "cannot reuse for the next, larger one; prefills also leave their attention workspace in the allocator's "
        "free lists. Above keys and values this came to up to 1.7x the batch's KV cache (the bundled model, 16 "
        "rows); the accounting counts two more KV caches per sequence (`executor.memory.kv_slack_bytes`), in "
        "the runtime column.",
        "",
    ])


if __name__ == "__main__":
    main()
