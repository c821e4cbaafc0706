"""Every device-side action of a step: the batch's KV cache, the forward pass, sampling, and the
expert updates between passes.

The scheduler says what a step does (``scheduler.Work``); the runner does it: rows leave the
batch, then one forward pass (a prefill alone, merged as the last row, or a decode pass over every
row), then each sequence's next token is chosen from its logits. After a pass that some sequence
continues from, ``after_pass`` hands the virtual experts their work between passes: routing
tables built since the last pass take effect, and the layers whose turn it is move their resident
sets toward importance (paper section 3.2), so nothing changes inside a pass.

A runner without virtual experts drives the unmodified model the same way (the baselines of
``benchmarks.runtime``).
"""

from __future__ import annotations

from typing import Callable, Sequence as Seq

import torch

from swapmoe.executor.sampling import choose_token, generator_for
from swapmoe.executor.kv_batch import make_batch
from swapmoe.executor.scheduler import Sequence, Work


class ModelRunner:
    def __init__(self, model: torch.nn.Module, experts=None, max_batch: int = 1, update_frequency: int = 0,
                 before_join: Callable[[], None] = lambda: None, settle_loads: bool = False):
        """``experts``: the model's ``VirtualExperts`` (None: a plain model); ``update_frequency``:
        passes between two updates of a layer (0: a static resident set); ``before_join``: what runs
        before a prefill (the engine puts a profile's slots back to the plan's); ``settle_loads``:
        wait for the loads an update starts before the next pass (deterministic, for scoring)."""
        self.model, self.experts = model, experts
        self.batch = make_batch(model, max_batch)
        self.update_frequency, self.before_join, self.settle_loads = update_frequency, before_join, settle_loads

    @property
    def capacity(self) -> int:
        """Rows the batch can hold (1 for encoder-decoder and sliding-window models)."""
        return self.batch.capacity

    def leave(self, rows: Seq[int]) -> None:
        """Drop these rows of the batch, with their KV cache."""
        if rows:
            self.batch.leave(list(rows))

    @torch.inference_mode()
    def run(self, work: Work) -> list[int]:
        """Carry out ``work``; returns the next token of each of ``work.sequences``."""
        self.leave(work.leave)
        if work.join is not None:
            self.before_join()
            if self.experts is not None:
                self.experts.begin_input()  # its prefill's routing is the freshest sign of what it needs
            logits = self.batch.join(work.join.context)[None]  # [1, V]
        elif work.decode:
            logits = self.batch.decode([s.last for s in work.decode])  # [B, V]
        else:
            return []
        return [choose_token(logits[row], s.request.sampling, self._sampler(s)) for row, s in enumerate(work.sequences)]

    def after_pass(self) -> None:
        """Between two passes: the virtual experts' turn (see the module docstring)."""
        if self.experts is not None:
            self.experts.between_passes(self.update_frequency)
            if self.settle_loads:
                self.experts.wait_for_loads()

    @staticmethod
    def _sampler(sequence: Sequence) -> torch.Generator | None:
        if sequence.sampler is None and sequence.request.sampling.temperature:
            sequence.sampler = generator_for(sequence.request.sampling)
        return sequence.sampler
