"""Text in and out of the model: the checkpoint's tokenizer, its end-of-sequence ids, and the
chunks a generation streams (stop sequences held back, UTF-8 characters never split, timings
on the last chunk).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from transformers import AutoTokenizer

from swapmoe.executor.requests import GenerationRequest
from swapmoe.executor.metrics import ServingStats


@dataclass(slots=True)
class Chunk:
    """One streamed piece of a generation; the last one has ``finish_reason`` set."""

    token_ids: list[int]
    text: str
    finish_reason: str = ""  # "", "length", "stop", "eos" or "context_full"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: dict = field(default_factory=dict)


class IncrementalText:
    """Turns the growing decoded text into safe-to-send deltas.

    Holds back an incomplete UTF-8 character (decoded as U+FFFD) and any tail
    that could still become a stop sequence, so a stop sequence is never sent.
    """

    def __init__(self, stop: tuple[str, ...]):
        self.stop = stop
        self.sent = 0

    def update(self, text: str) -> tuple[str, bool]:
        """(new text to send, whether a stop sequence ended the generation)."""
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            return self._advance(text, min(hits)), True
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        for s in self.stop:
            for n in range(min(len(s) - 1, end - self.sent), 0, -1):
                if text[end - n:end] == s[:n]:
                    end -= n
                    break
        return self._advance(text, end), False

    def flush(self, text: str) -> str:
        return self._advance(text, len(text))

    def _advance(self, text: str, end: int) -> str:
        delta = text[self.sent:max(end, self.sent)]
        self.sent = max(end, self.sent)
        return delta


class TextCodec:
    """The checkpoint's tokenizer and the ids that end a generation."""

    def __init__(self, model_dir: Path, model):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        ids = model.generation_config.eos_token_id if model.generation_config else None
        ids = ids if ids is not None else self.tokenizer.eos_token_id
        self.eos: set[int] = set() if ids is None else set(ids) if isinstance(ids, (list, tuple)) else {ids}

    def encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def stream_chunks(steps: Iterator[tuple[int, int]], codec: TextCodec, request: GenerationRequest, finish: str,
                  stats: ServingStats, cancelled: Callable[[], bool], enqueued_ns: int,
                  start_ns: int) -> Iterator[Chunk]:
    """Chunks for ``steps`` ((token, when it was computed) pairs) until EOS, a stop sequence or
    the end of the steps (``finish`` says why those end); records latencies in ``stats``.
    Stops silently once ``cancelled()``. ``steps`` is closed as soon as the generation ends,
    before the last chunk, so no forward pass runs for a token nobody will read."""
    text = IncrementalText(request.stop)
    generated: list[int] = []
    times: list[int] = []
    with contextlib.closing(steps):
        for token, computed in steps:
            if cancelled():
                return
            times.append(computed)
            stats.token(times[-1] - times[-2] if len(times) > 1 else None)
            if len(times) == 1:
                stats.first_token(times[0] - start_ns)
            generated.append(token)
            if token in codec.eos:
                finish = "eos"
                yield Chunk([token], "")
                break
            delta, stopped = text.update(codec.decode(generated))
            yield Chunk([token], delta)
            if stopped:
                finish = "stop"
                break
    tail = "" if finish == "stop" else text.flush(codec.decode(generated))
    stats.finished()
    gaps = [b - a for a, b in zip(times, times[1:])]
    yield Chunk([], tail, finish, len(request.prompt_ids), len(generated), dict(
        queue_ns=start_ns - enqueued_ns,
        time_to_first_token_ns=times[0] - start_ns if times else 0,
        mean_inter_token_ns=sum(gaps) // len(gaps) if gaps else 0,
        total_ns=time.perf_counter_ns() - start_ns,
    ))
