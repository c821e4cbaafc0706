"""The executor's engine: one model, its virtual experts, its budget, its plan.

Forward passes and plan changes take turns under one lock, so a plan or a
budget change lands between two forward passes and never inside one. The model
never exists whole in memory: dense weights plus each layer's slots
(``executor.runtime``), sized by the plan within the budget.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import psutil
import torch

from transformers import AutoTokenizer

from executor import memory, plan_file
from executor.admission import Admission
from executor.generation import GenerationRequest, IncrementalText, generate_ids
from executor.metrics import ServingStats
from executor.runtime import VirtualExperts
from executor.telemetry import TelemetryHub
from swapmoe.layout import DeviceInfo
from swapmoe.memory import MemoryReport
from swapmoe.plan import InvalidField, Plan, PlanResult, even_split, validate_plan
from swapmoe.sizes import format_size
from swapmoe.v1 import telemetry_pb2 as tpb

DEFAULT_MAX_CONTEXT = 2048
log = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineConfig:
    model_dir: Path
    budget_bytes: int
    node_id: str = field(default_factory=socket.gethostname)
    device: str = "cpu"
    # Longest prompt + completion; 0 means the model's limit, at most DEFAULT_MAX_CONTEXT.
    max_context: int = 0
    store_root: Path | None = None  # where the expert store is built; None: executor.store.default_root()
    max_queue: int = 64  # generation requests that may wait for their turn (more: RESOURCE_EXHAUSTED)
    state_dir: Path | None = None  # where the last acknowledged plan is kept, to resume it after a restart
    max_loads_per_update: int = 1  # per layer: how far one update moves the resident set
    load_bandwidth: int = 0  # bytes/s cap on expert reads (0: none), to leave the device's storage to others
    # torch intra-op threads; 0: all cores but one, which is left to gRPC, telemetry and expert loads.
    threads: int = 0


@dataclass(slots=True)
class Chunk:
    """One streamed piece of a generation; the last one has ``finish_reason`` set."""

    token_ids: list[int]
    text: str
    finish_reason: str = ""  # "", "length", "stop", "eos" or "context_full"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: dict = field(default_factory=dict)


class Engine:
    def __init__(self, config: EngineConfig, hub: TelemetryHub | None = None):
        self.config = config
        self.hub = hub or TelemetryHub(config.node_id)
        torch.set_num_threads(config.threads or max(1, len(os.sched_getaffinity(0)) - 1))
        self.runtime = VirtualExperts(config.model_dir, config.device, config.store_root,
                                      max_loads_per_update=config.max_loads_per_update,
                                      load_bandwidth=config.load_bandwidth or None)
        self.model, self.layout = self.runtime.model, self.runtime.layout
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_dir, local_files_only=True)
        limit = self.layout.max_positions or DEFAULT_MAX_CONTEXT
        self.max_context = config.max_context or min(limit, DEFAULT_MAX_CONTEXT)
        dtype_bytes = next(self.model.parameters()).element_size()
        self.kv_bytes = memory.kv_cache_bytes(self.model.config, self.max_context, dtype_bytes)
        self.activation_bytes = memory.activation_bytes(self.model.config, self.max_context, dtype_bytes)
        self.min_budget_bytes = self._fixed_bytes() + self.layout.expert_bytes([1] * self.layout.num_layers)
        self._check_budget(config.budget_bytes)
        self.budget_bytes = config.budget_bytes
        self.device_info = _device_info(config.device)
        self.stats = ServingStats()
        self._step_lock = threading.Lock()  # forward passes vs. plan/budget changes
        self._forward_thread = ThreadPoolExecutor(1, thread_name_prefix="forward")  # see _run_ahead
        self.admission = Admission(config.max_queue)  # one generation at a time, FIFO, bounded
        self.plan = Plan(0, self._fitting_experts(self.budget_bytes), origin="executor:initial even split")
        resumed, note = self._saved_plan()
        self.plan = resumed or self.plan
        self.achieved: tuple[int, ...] = ()
        self._apply_residency(self.plan)
        self.hub.event(tpb.Event.KIND_STARTED, f"serving {self.layout.model_class} from {config.model_dir}; {note}",
                       plan_version=self.plan.version)

    def _saved_plan(self) -> tuple[Plan | None, str]:
        """The last acknowledged plan from ``state_dir`` if it still applies, and what happened."""
        if self.config.state_dir is None:
            return None, "no state directory: starting from an even split"
        try:
            plan = plan_file.load(self.config.state_dir)
            if plan is None:
                return None, "no saved plan: starting from an even split"
            validate_plan(plan, self.layout)
        except ValueError as error:
            log.warning("ignoring the saved plan: %s", error)
            return None, f"ignored the saved plan ({error})"
        if (need := self.plan_bytes(plan.experts_per_layer)) > self.budget_bytes:
            return None, (f"ignored saved plan {plan.version}: it needs {format_size(need)}, "
                          f"over the budget of {format_size(self.budget_bytes)}")
        return plan, f"resumed saved plan {plan.version} {list(plan.experts_per_layer)}"

    # --- memory -----------------------------------------------------------------
    def _fixed_bytes(self) -> int:
        return self.layout.dense_bytes + self.runtime.staging_bytes + self.kv_bytes + self.activation_bytes

    def _fitting_experts(self, budget: int) -> tuple[int, ...]:
        return even_split(self.layout, budget - self._fixed_bytes())

    def plan_bytes(self, experts_per_layer) -> int:
        return self._fixed_bytes() + self.layout.expert_bytes(experts_per_layer)

    def _check_budget(self, budget: int) -> None:
        if budget < self.min_budget_bytes:
            raise InvalidField(
                "budget_bytes",
                f"{format_size(budget)} is below this model's minimum of {format_size(self.min_budget_bytes)} "
                f"({self.min_budget_bytes} bytes: dense weights, one expert per layer, KV cache and activations)",
            )

    def memory(self) -> MemoryReport:
        return MemoryReport(
            budget_bytes=self.budget_bytes,
            dense_bytes=self.layout.dense_bytes,
            expert_bytes=self.runtime.slot_bytes() + self.runtime.staging_bytes,
            kv_cache_bytes=self.kv_bytes,
            activation_bytes=self.activation_bytes,
            process_rss_bytes=memory.process_rss(),
            process_peak_rss_bytes=memory.process_peak_rss(),
        )

    # --- plans and budgets ------------------------------------------------------
    def apply_plan(self, plan: Plan) -> PlanResult:
        """ACK or NACK a well-formed plan; raises InvalidField for a malformed one."""
        start = time.perf_counter_ns()
        validate_plan(plan, self.layout)
        with self._step_lock:  # checks and application together: concurrent plans and budgets serialize
            reason = ""
            if plan.version <= self.plan.version:
                reason = f"plan.version {plan.version} is not newer than the current plan's version {self.plan.version}"
            elif (need := self.plan_bytes(plan.experts_per_layer)) > self.budget_bytes:
                reason = (f"plan needs {format_size(need)} ({need} bytes) but the budget is "
                          f"{format_size(self.budget_bytes)} ({self.budget_bytes} bytes)")
            if not reason:
                self._apply_residency(plan)
                if self.config.state_dir is not None:
                    plan_file.save(self.config.state_dir, plan)
        if reason:
            self.hub.event(tpb.Event.KIND_PLAN_REJECTED, reason, plan_version=plan.version)
            return PlanResult(plan.version, False, reason, memory=self.memory())
        self.hub.event(tpb.Event.KIND_PLAN_APPLIED, f"plan {plan.version} applied: {list(self.achieved)}",
                       plan_version=plan.version)
        return PlanResult(plan.version, True, "", self.achieved, self.memory(), time.perf_counter_ns() - start)

    def set_budget(self, budget: int, reason: str = "") -> int:
        """Apply a new budget at once, shrinking the plan if it no longer fits; returns the old budget."""
        self._check_budget(budget)
        with self._step_lock:
            previous, self.budget_bytes = self.budget_bytes, budget
            if self.plan_bytes(self.plan.experts_per_layer) > budget:
                fit = self._fitting_experts(budget)
                kept = tuple(min(a, b) for a, b in zip(fit, self.plan.experts_per_layer))
                self._apply_residency(Plan(self.plan.version, kept, self.plan.update_frequency,
                                           self.plan.strategy, "executor:shrunk for budget"))
        self.hub.event(tpb.Event.KIND_BUDGET_CHANGED,
                       f"budget {format_size(previous)} -> {format_size(budget)}" + (f": {reason}" if reason else ""),
                       previous_budget_bytes=previous, budget_bytes=budget)
        return previous

    def _apply_residency(self, plan: Plan) -> None:
        """Give each layer the plan's slots (shrinking keeps the most important experts) and its
        strategy. Caller holds the step lock."""
        if plan.strategy is not self.runtime.strategy:
            self.runtime.set_strategy(plan.strategy)
        if tuple(plan.experts_per_layer) != self.runtime.capacities:
            self.runtime.resize(plan.experts_per_layer)
        self.plan = plan
        self.achieved = self.runtime.capacities

    def expert_stats(self) -> list[tuple[list[int], list[float], list[int]]]:
        """Per layer: cumulative activations, cumulative importance, resident experts."""
        with self._step_lock:
            return [(*layer.router.stats(), layer.pool.resident) for layer in self.runtime.layers]

    def swap_stats(self) -> tuple[int, int, float]:
        """Cumulative expert loads, bytes read and seconds spent reading."""
        return self.runtime.io.snapshot()

    # --- generation -------------------------------------------------------------
    def tokenize(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, request: GenerationRequest, cancelled: Callable[[], bool] = lambda: False) -> Iterator[Chunk]:
        """Stream a completion. Closing the iterator stops the work; so does ``cancelled()``
        turning true (a client gone or past its deadline), checked while the request waits
        and between tokens. Raises Busy when too many requests wait already."""
        if len(request.prompt_ids) >= self.max_context:
            raise InvalidField("prompt", f"has {len(request.prompt_ids)} tokens; the context window is "
                                         f"{self.max_context}, leaving no room to generate")
        vocab = self.layout.vocab_size
        if vocab and max(request.prompt_ids) >= vocab:
            raise InvalidField("prompt.token_ids", f"token id {max(request.prompt_ids)} is outside the vocabulary (size {vocab})")
        enqueued = time.perf_counter_ns()
        self.admission.acquire(cancelled)
        try:
            yield from self._generate(request, enqueued, cancelled)
        finally:
            self.admission.release()

    def _generate(self, request: GenerationRequest, enqueued: int, cancelled: Callable[[], bool]) -> Iterator[Chunk]:
        start = time.perf_counter_ns()
        room = self.max_context - len(request.prompt_ids)
        finish = "length" if request.max_new_tokens <= room else "context_full"
        tokens = generate_ids(self.model, request.prompt_ids, min(request.max_new_tokens, room),
                              request.sampling, between_steps=self._between_steps)
        eos = _eos_ids(self.model, self.tokenizer)
        self.runtime.begin_input()
        text = IncrementalText(request.stop)
        generated: list[int] = []
        times: list[int] = []
        steps = _run_ahead(tokens, self._step_lock, self._forward_thread, eos)
        # Closing frees the KV cache at once when the client goes away (steps first, then tokens).
        with contextlib.closing(tokens), contextlib.closing(steps):
            for token, computed in steps:
                if cancelled():
                    return
                times.append(computed)
                self.stats.token(times[-1] - times[-2] if len(times) > 1 else None)
                if len(times) == 1:
                    self.stats.first_token(times[0] - start)
                generated.append(token)
                if token in eos:
                    finish = "eos"
                    yield Chunk([token], "")
                    break
                delta, stopped = text.update(self._decode(generated))
                yield Chunk([token], delta)
                if stopped:
                    finish = "stop"
                    break
        tail = "" if finish == "stop" else text.flush(self._decode(generated))
        self.stats.finished()
        gaps = [b - a for a, b in zip(times, times[1:])]
        yield Chunk([], tail, finish, len(request.prompt_ids), len(generated), dict(
            queue_ns=start - enqueued,
            time_to_first_token_ns=times[0] - start if times else 0,
            mean_inter_token_ns=sum(gaps) // len(gaps) if gaps else 0,
            total_ns=time.perf_counter_ns() - start,
        ))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _between_steps(self) -> None:
        """Between forward passes (step lock held): see ``VirtualExperts.between_passes``."""
        self.runtime.between_passes(self.plan.update_frequency)

    def close(self) -> None:
        self._forward_thread.shutdown(wait=True)
        self.runtime.close()


def _run_ahead(tokens: Iterator[int], lock: threading.Lock, worker: ThreadPoolExecutor,
               eos: set[int]) -> Iterator[tuple[int, int]]:
    """Yield (token, when it was computed), computing tokens on the one ``worker`` thread, each
    forward pass under ``lock``, ahead of the consumer until it closes this iterator or EOS.

    The model always runs on the same thread whichever RPC thread serves the request (torch's
    intra-op thread team is per calling thread; teams left spinning by many request threads
    steal the cores from the one doing the work), and the next forward pass overlaps with
    decoding and sending the previous token."""
    out: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def produce():
        try:
            while not stop.is_set():
                with lock:
                    token = next(tokens, None)
                if token is None:
                    break
                out.put((token, time.perf_counter_ns()))
                if token in eos:
                    break
        except BaseException as error:  # handed to the consumer
            out.put((error, 0))
        out.put((None, 0))

    job = worker.submit(produce)
    try:
        while (item := out.get())[0] is not None:
            if isinstance(item[0], BaseException):
                raise item[0]
            yield item
    finally:
        stop.set()
        job.result()  # the step in flight finishes before the caller closes ``tokens``


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config else None
    ids = ids if ids is not None else tokenizer.eos_token_id
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, (list, tuple)) else {ids}


def _device_info(device: str) -> DeviceInfo:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return DeviceInfo("cuda", props.name, props.total_memory, os.cpu_count() or 1, socket.gethostname())
    return DeviceInfo("cpu", platform.processor() or platform.machine(), psutil.virtual_memory().total,
                      len(os.sched_getaffinity(0)), socket.gethostname())
