"""A running decode batch: rows join with their own prefill, leave at any step, and every row
gets the tokens it would get alone.

Batched logits differ from solo ones by float noise (another GEMM shape), so these tests compare
tokens; a mismatch reports the solo top-2 margin, which tells a near-tie from a bug.
"""

from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache

from swapmoe.executor.checkpoint import load_checkpoint
from swapmoe.executor.requests import SamplingParams
from swapmoe.executor.sampling import choose_token
from swapmoe.executor.kv_batch import CausalBatch, SoloBatch, make_batch
from swapmoe.models.bundled import LM_DIR
from swapmoe.models.tiny import build_tiny_model

NO_BUNDLED = pytest.mark.skipif(not (LM_DIR / "model.safetensors").exists(),
                                reason="bundled checkpoint not trained yet")


@pytest.fixture(scope="module")
def load(checkpoint_dirs):
    """Models through our loader, once each: a tiny architecture's name, or "swapmoe-lm"."""
    loaded = {}

    def get(name: str, attention: str = "sdpa"):
        if (name, attention) not in loaded:
            path = LM_DIR if name == "swapmoe-lm" else checkpoint_dirs(name)
            model = load_checkpoint(path).model
            model.set_attn_implementation(attention)
            loaded[name, attention] = model
        return loaded[name, attention]

    return get


@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    joins_at: int  # the decode step before which it joins
    new_tokens: int
    sampling: SamplingParams = SamplingParams()


def seeded(sampling: SamplingParams) -> torch.Generator | None:
    return torch.Generator().manual_seed(sampling.seed) if sampling.temperature else None


@torch.inference_mode()
def alone(model, request: Request) -> tuple[list[int], list[float]]:
    """Tokens of one request on its own (batch 1, a plain DynamicCache) and each step's top-2 margin."""
    generator, cache = seeded(request.sampling), DynamicCache(config=model.config)
    ids, tokens, margins = torch.tensor([request.prompt]), [], []
    for _ in range(request.new_tokens):
        logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        first, second = logits.topk(2).values.tolist()
        margins.append(first - second)
        tokens.append(choose_token(logits, request.sampling, generator))
        ids = torch.tensor([[tokens[-1]]])
    return tokens, margins


def together(batch, requests: list[Request]) -> list[list[int]]:
    """Drives `batch` as the batcher does: joins before a step's decode pass, and a row leaves as
    soon as it has its tokens."""
    generators = [seeded(r.sampling) for r in requests]
    tokens: list[list[int]] = [[] for _ in requests]
    rows: list[int] = []  # the request in each row
    step = 0
    while rows or step <= max(r.joins_at for r in requests):
        for i, request in enumerate(requests):
            if request.joins_at == step:
                tokens[i].append(choose_token(batch.join(request.prompt), request.sampling, generators[i]))
                rows.append(i)
        done = [row for row, i in enumerate(rows) if len(tokens[i]) == requests[i].new_tokens]
        batch.leave(done)
        rows = [i for row, i in enumerate(rows) if row not in done]
        if rows:
            logits = batch.decode([tokens[i][-1] for i in rows])  # [B, V]
            for row, i in enumerate(rows):
                tokens[i].append(choose_token(logits[row], requests[i].sampling, generators[i]))
        step += 1
    assert len(batch) == 0
    return tokens


def assert_each_as_alone(model, requests: list[Request], tokens: list[list[int]]) -> None:
    for request, got in zip(requests, tokens):
        want, margins = alone(model, request)
        step = next((n for n, (a, b) in enumerate(zip(got, want)) if a != b), None)
        assert got == want, (f"prompt {request.prompt} {request.sampling}: step {step} differs; "
                             f"solo top-2 margin there {margins[step]:.2e} (about 1e-5 or less is a float near-tie)")


def prompt(length: int, seed: int) -> tuple[int, ...]:
    return tuple(torch.randint(3, 250, (length,), generator=torch.Generator().manual_seed(seed)).tolist())


# Long and short prompts; B (the longest) leaves first, so trimming happens mid-run; E joins the
# row B freed; at step 6 four rows run at once.
STAGGERED = [
    Request(prompt(5, 0), joins_at=0, new_tokens=9),
    Request(prompt(11, 1), joins_at=0, new_tokens=4),
    Request(prompt(2, 2), joins_at=3, new_tokens=10),
    Request(prompt(8, 3), joins_at=5, new_tokens=6),
    Request(prompt(3, 4), joins_at=6, new_tokens=3),
]


@pytest.mark.parametrize("name, attention", [
    *[(arch, "sdpa") for arch in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")],
    ("mixtral", "eager"),
    pytest.param("swapmoe-lm", "sdpa", marks=NO_BUNDLED),
])
def test_rows_joining_and_leaving_mid_batch_decode_the_tokens_each_would_alone(load, name, attention):
    model = load(name, attention)
    batch = make_batch(model, 4)
    assert isinstance(batch, CausalBatch)
    assert_each_as_alone(model, STAGGERED, together(batch, STAGGERED))


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "olmoe"])
def test_seeded_sampling_per_row_equals_sampling_alone(load, name):
    model = load(name)
    samplings = [
        SamplingParams(),
        SamplingParams(temperature=0.8, seed=1),
        SamplingParams(temperature=1.0, top_k=20, seed=2),
        SamplingParams(temperature=0.7, top_p=0.9, seed=3),
        SamplingParams(temperature=1.2, seed=4),
    ]
    requests = [Request(r.prompt, r.joins_at, r.new_tokens, s) for r, s in zip(STAGGERED, samplings)]
    assert_each_as_alone(model, requests, together(make_batch(model, 4), requests))


def widths(batch: CausalBatch) -> set[int]:
    """KV columns of every layer, and of the attention mask."""
    return {layer.keys.shape[-2] for layer in batch.cache.layers} | {batch.mask.shape[1]}


def test_leaving_trims_padding_columns_no_row_needs(load):
    model = load("mixtral")
    long, short = Request(prompt(12, 5), 0, 6), Request(prompt(3, 6), 0, 6)
    batch = CausalBatch(model, 2)
    first = [int(batch.join(r.prompt).argmax()) for r in (long, short)]
    second = batch.decode(first).argmax(-1).tolist()
    assert widths(batch) == {13}
    batch.leave([1])  # the long row still needs every column
    assert widths(batch) == {13}

    batch.join(short.prompt)
    batch.decode([second[0], first[1]])
    batch.leave([0])  # the short row had 3 + 1 columns, all real; the rest were its left pads
    assert widths(batch) == {4} and batch.mask.tolist() == [[1, 1, 1, 1]]
    tokens = first[1:]
    for _ in range(4):
        tokens.append(int(batch.decode([tokens[-1]]).argmax()))
    assert tokens == alone(model, Request(short.prompt, 0, 5))[0]

    batch.leave([0])
    assert len(batch) == 0 and batch.cache is None
    batch.join(long.prompt)  # an emptied batch starts afresh
    assert widths(batch) == {12}


def test_position_ids_count_each_rows_own_tokens(load):
    model = load("mixtral")
    decodes = []  # (position_ids, attention_mask) of each decode pass; prefills pass neither

    def record(_, args, kwargs):
        if kwargs["position_ids"] is not None:
            decodes.append((kwargs["position_ids"].tolist(), kwargs["attention_mask"].tolist()))

    hook = model.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        batch = CausalBatch(model, 3)
        batch.lean = None  # the model's own forward, whose inputs the hook sees (tests/test_lean_decode.py)
        batch.join(prompt(5, 7))
        batch.join(prompt(2, 8))
        batch.decode([10, 11])
        batch.decode([12, 13])
        batch.join(prompt(9, 9))  # longer than the running rows: they get more left padding
        batch.decode([14, 15, 16])
    finally:
        hook.remove()
    assert decodes == [
        ([[5], [2]], [[1] * 6, [0, 0, 0, 1, 1, 1]]),
        ([[6], [3]], [[1] * 7, [0, 0, 0, 1, 1, 1, 1]]),
        ([[7], [4], [9]], [[0, 0] + [1] * 8, [0] * 5 + [1] * 5, [1] * 10]),
    ]


def test_a_full_batch_refuses_another_row(load):
    batch = make_batch(load("mixtral"), 1)
    batch.join(prompt(3, 10))
    with pytest.raises(RuntimeError):
        batch.join(prompt(3, 11))


def solo_tokens(batch, prompt_ids: tuple[int, ...], count: int) -> list[int]:
    tokens = [int(batch.join(prompt_ids).argmax())]
    while len(tokens) < count:
        tokens.append(int(batch.decode([tokens[-1]])[0].argmax()))
    batch.leave([0])
    return tokens


def transformers_greedy(model, prompt_ids: tuple[int, ...], count: int) -> list[int]:
    """The reference: transformers' own greedy ``generate`` on the same model, ``count`` tokens."""
    out = model.generate(torch.tensor([list(prompt_ids)]), max_new_tokens=count, min_new_tokens=count,
                         do_sample=False)[0].tolist()
    return out[1:] if model.config.is_encoder_decoder else out[len(prompt_ids):]  # past the start token


def test_an_encoder_decoder_model_gets_a_solo_batch(checkpoint_dirs):
    model = load_checkpoint(checkpoint_dirs("switch_transformers")).model
    batch = make_batch(model, 4)
    assert isinstance(batch, SoloBatch) and batch.capacity == 1
    batch.join(prompt(6, 12))
    with pytest.raises(RuntimeError):
        batch.join(prompt(6, 13))
    batch.leave([0])
    for seed in (12, 13):
        ids = prompt(6, seed)
        assert solo_tokens(batch, ids, 6) == transformers_greedy(model, ids, 6)


def test_a_sliding_window_model_gets_a_solo_batch():
    model = build_tiny_model("mixtral", sliding_window=6)  # a sliding layer would count pads in its window
    with pytest.raises(ValueError):
        CausalBatch(model, 4)
    batch = make_batch(model, 4)
    assert isinstance(batch, SoloBatch) and batch.capacity == 1
    ids = prompt(9, 14)
    assert solo_tokens(batch, ids, 6) == transformers_greedy(model, ids, 6)
