"""The executor's engine: one model, its virtual experts, its budget, its plan.

It composes the pieces and owns no policy of its own: ``VirtualExperts`` (the model with
budgeted expert slots), ``PlanBook`` (which plans fit the budget, the saved plan),
``Scheduler`` (one generation at a time, forward passes and plan changes taking turns)
and ``TextCodec`` (tokens in and out). The model never exists whole in memory: dense
weights plus each layer's slots, sized by the plan within the budget.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import psutil
import torch

from swapmoe.core.budget import MemoryModel, Reserve
from swapmoe.core.errors import InvalidField
from swapmoe.core.layout import DeviceInfo, ModelLayout
from swapmoe.core.memory import MemoryReport
from swapmoe.core.plan import Plan, PlanResult, validate_plan
from swapmoe.core.sizes import format_size
from swapmoe.executor import memory
from swapmoe.executor.generation import GenerationRequest
from swapmoe.executor.kv_batch import make_batch
from swapmoe.executor.loader import LoadCounters
from swapmoe.executor.metrics import ServingStats
from swapmoe.executor.plans import PlanBook
from swapmoe.executor.profiling import SWEEP_PROMPT, Identity, ProfileProgress, ProfileSpec, profile
from swapmoe.executor.scheduler import Scheduler, sequence_for
from swapmoe.executor.telemetry import TelemetryHub
from swapmoe.executor.text import Chunk, TextCodec, stream_chunks
from swapmoe.executor.virtual_experts import LayerActivity, VirtualExperts
from swapmoe.v1 import telemetry_pb2 as tpb

DEFAULT_MAX_CONTEXT = 2048


@dataclass(slots=True)
class EngineConfig:
    model_dir: Path
    budget_bytes: int
    node_id: str = field(default_factory=socket.gethostname)
    device: str = "cpu"
    # Longest prompt + completion; 0 means the model's limit, at most DEFAULT_MAX_CONTEXT.
    max_context: int = 0
    store_root: Path | None = None  # where the expert store is built; None: executor.store_build.default_root()
    max_queue: int = 64  # generation requests that may wait for their turn (more: RESOURCE_EXHAUSTED)
    # Generations decoded together (continuous batching; encoder-decoder models run one at a time).
    # The budget reserves the KV cache and logits of this many sequences.
    max_batch: int = 8
    state_dir: Path | None = None  # where the last acknowledged plan is kept, to resume it after a restart
    max_loads_per_update: int = 1  # per layer: how far one update moves the resident set
    load_bandwidth: int = 0  # bytes/s cap on expert reads (0: none), to leave the device's storage to others
    # torch intra-op threads; 0: all cores but one, which is left to gRPC, telemetry and expert loads.
    threads: int = 0


class Engine:
    def __init__(self, config: EngineConfig, hub: TelemetryHub | None = None):
        self.config = config
        self.hub = hub or TelemetryHub(config.node_id)
        torch.set_num_threads(config.threads or max(1, len(os.sched_getaffinity(0)) - 1))
        self.runtime = VirtualExperts(config.model_dir, config.device, config.store_root,
                                      max_loads_per_update=config.max_loads_per_update,
                                      load_bandwidth=config.load_bandwidth or None)
        try:
            self.text = TextCodec(config.model_dir, self.model)
            limit = self.layout.max_positions or DEFAULT_MAX_CONTEXT
            if self.layout.max_positions and config.max_context > limit:
                raise InvalidField("max_context", f"{config.max_context} is above the model's {limit} positions")
            self.max_context = config.max_context or min(limit, DEFAULT_MAX_CONTEXT)
            dtype_bytes = next(self.model.parameters()).element_size()
            self.device_info = _device_info(config.device)
            batch = make_batch(self.model, config.max_batch)
            kv = memory.kv_cache_bytes(self.model.config, self.max_context, dtype_bytes)
            activations = lambda rows: memory.activation_bytes(self.model.config, self.max_context,  # noqa: E731
                                                               dtype_bytes, rows)
            # Each sequence past the first: its KV cache with the cache's growth slack, and a row of
            # logits. Plans leave room for a full batch; one that fits with one sequence is accepted,
            # and the batch takes the rest.
            self.sequence_bytes = kv + memory.kv_slack_bytes(kv) + activations(2) - activations(1)
            self.memory_model = MemoryModel(self.layout, Reserve(
                self.runtime.staging_bytes, kv, activations(1), (batch.capacity - 1) * self.sequence_bytes,
                memory.runtime_bytes(kv),
            ), self.device_info.memory_bytes)
            self.plans = PlanBook(self.memory_model, config.budget_bytes, config.state_dir)
            note = self.plans.resume()
            self.stats = ServingStats()
            self.scheduler = Scheduler(config.max_queue)
            self.scheduler.attach(batch, self._between_steps, self._joining, self.text.eos)
            self._apply_residency(self.plan)
            self.scheduler.resize(self.batch_rows(self.budget_bytes, self.plan))
            self.hub.event(tpb.Event.KIND_STARTED, f"serving {self.layout.model_class} from {config.model_dir}; {note}",
                           plan_version=self.plan.version)
        except BaseException:
            self.runtime.close()  # a budget below the minimum, an unreadable tokenizer: leave no loader thread
            raise

    # --- what it serves -------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self.runtime.model

    @property
    def layout(self) -> ModelLayout:
        return self.runtime.layout

    @property
    def model_fingerprint(self) -> str:
        """The checkpoint's content hash, taken once when its expert store was built."""
        return self.runtime.store.manifest.model_fingerprint

    @property
    def plan(self) -> Plan:
        return self.plans.current

    @property
    def budget_bytes(self) -> int:
        return self.plans.budget_bytes

    @property
    def achieved(self) -> tuple[int, ...]:
        """Slots per layer now: what the plan in force achieved."""
        return self.runtime.capacities

    @property
    def min_budget_bytes(self) -> int:
        return self.memory_model.min_budget_bytes

    def batch_rows(self, budget: int, plan: Plan) -> int:
        """Sequences ``budget`` holds beside ``plan`` (at least one: plans are checked for one)."""
        one = self.memory_model.plan_bytes(plan.experts_per_layer) - self.memory_model.reserve.batch_bytes
        return max(1, min(self.scheduler.capacity, 1 + (budget - one) // self.sequence_bytes))

    def memory(self) -> MemoryReport:
        reserve, rows = self.memory_model.reserve, self.scheduler.limit
        kv, slack = reserve.kv_cache_bytes, memory.kv_slack_bytes(reserve.kv_cache_bytes)
        return MemoryReport(
            budget_bytes=self.budget_bytes,
            dense_bytes=self.layout.dense_bytes,
            expert_bytes=self.runtime.slot_bytes() + reserve.staging_bytes,
            kv_cache_bytes=kv * rows,
            activation_bytes=reserve.activation_bytes + (rows - 1) * (self.sequence_bytes - kv - slack),
            runtime_bytes=reserve.runtime_bytes + (rows - 1) * slack,
            process_rss_bytes=memory.process_rss(),
            process_peak_rss_bytes=memory.process_peak_rss(),
        )

    # --- plans and budgets ------------------------------------------------------
    def apply_plan(self, plan: Plan) -> PlanResult:
        """ACK or NACK a well-formed plan; raises InvalidField for a malformed one."""
        start = time.perf_counter_ns()
        validate_plan(plan, self.layout)
        with self.scheduler.between_passes():  # checks and application together: plans and budgets serialize
            self.plans.check_step(plan)
            previous = self.budget_bytes
            reason = self.plans.review(plan)
            if not reason:
                budget = plan.budget_bytes or previous
                rows = self.batch_rows(budget, plan)
                self.scheduler.resize(min(self.scheduler.limit, rows))  # rows leave before slots grow
                if budget > previous:  # a budget grows before the slots do, and shrinks after them:
                    self.plans.set_budget(budget, None)  # accounted bytes never exceed it
                self._apply_residency(plan)
                unsaved = self.plans.accept(plan)
                if budget < previous:
                    self.plans.set_budget(budget, None)
                self.scheduler.resize(rows)
        if not reason and self.budget_bytes != previous:
            self.hub.event(tpb.Event.KIND_BUDGET_CHANGED,
                           f"budget {format_size(previous)} -> {format_size(self.budget_bytes)}: with plan {plan.version}",
                           previous_budget_bytes=previous, budget_bytes=self.budget_bytes)
        if reason:
            self.hub.event(tpb.Event.KIND_PLAN_REJECTED, reason, plan_version=plan.version)
            return PlanResult(plan.version, False, reason, memory=self.memory())
        note = f"applied, but {unsaved}: a restart meanwhile resumes an older plan" if unsaved else ""
        self.hub.event(tpb.Event.KIND_PLAN_APPLIED, f"plan {plan.version} applied: {list(self.achieved)}"
                       + (f"; {unsaved}" if unsaved else ""), plan_version=plan.version)
        return PlanResult(plan.version, True, note, self.achieved, self.memory(), time.perf_counter_ns() - start)

    def set_budget(self, budget: int, reason: str = "") -> int:
        """Apply a new budget at once, taking rows out of the batch, then shrinking the plan, as far
        as it no longer fits (and the other way round when it grows); returns the old budget."""
        self.memory_model.check_budget(budget)
        with self.scheduler.between_passes():
            previous = self.budget_bytes
            shrunk = self.plans.shrunk_for(budget)
            rows = self.batch_rows(budget, shrunk or self.plan)
            self.scheduler.resize(min(self.scheduler.limit, rows))  # rows, then slots, shrink before the budget
            if shrunk is not None:  # does: accounted bytes never exceed it
                self._apply_residency(shrunk)
            self.plans.set_budget(budget, shrunk)
            self.scheduler.resize(rows)
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

    # --- the state directory ------------------------------------------------------
    def keep_state(self, name: str, text: str, mode: int = 0o644) -> None:
        """Keep ``text`` in the state directory's file ``name`` (nothing without one), retried until written."""
        if self.plans.files is not None:
            self.plans.files.keep(name, text, mode)

    @property
    def state_error(self) -> str:
        """Why the state directory lags behind (its writes fail and are retried), "" when it does not."""
        return self.plans.files.error if self.plans.files is not None else ""

    @property
    def state_writes(self) -> tuple[int, int]:
        """(state file writes that failed, ever; files not written yet)."""
        files = self.plans.files
        return (files.failures, files.unsaved) if files is not None else (0, 0)

    # --- statistics ---------------------------------------------------------------
    def activity(self) -> list[LayerActivity]:
        """Per layer: cumulative activations and importance, and the resident experts."""
        with self.scheduler.between_passes():
            return self.runtime.activity()

    def load_counters(self) -> LoadCounters:
        """Cumulative expert loads, bytes read and seconds spent reading."""
        return self.runtime.io.snapshot()

    @property
    def load_tier(self) -> str:
        return self.runtime.tier

    @property
    def queue_depth(self) -> int:
        return self.scheduler.waiting

    @property
    def running(self) -> int:
        return self.scheduler.running

    def profile(self, spec: ProfileSpec, cancelled: Callable[[], bool] = lambda: False) -> Iterator[ProfileProgress]:
        """Measure this device and model (``executor.profiling``), one short measurement at a time,
        each in its turn in the generation queue (no generation shares the cores meanwhile): the
        generations that arrive while one runs are served before the next, so a long profile delays
        a request by one measurement, not by the whole profile. Raises InvalidField for a sweep
        residency that cannot run or does not fit the budget, Cancelled when ``cancelled()`` turns true."""
        if spec.experts_per_layer:
            self.check_residency(spec.experts_per_layer)
        identity = Identity(self.config.node_id, self.device_info, self.model_fingerprint)

        def sweep() -> tuple[int, ...]:  # asked at each measurement: plans and budgets change between two
            return self.memory_model.shrink(spec.experts_per_layer or self.plan.experts_per_layer, self.budget_bytes)

        with self.scheduler.exclusive(cancelled) as measurement:
            try:
                yield from profile(self.runtime, spec, identity, sweep, cancelled, measurement)
            finally:  # however it ended, the slots are the plan's again
                with self.scheduler.between_passes():
                    self._back_to_plan()

    def check_residency(self, experts_per_layer: tuple[int, ...]) -> None:
        """InvalidField (``experts_per_layer...``) unless the layout can run it within the budget."""
        try:
            validate_plan(Plan(0, tuple(experts_per_layer)), self.layout)
        except InvalidField as error:
            raise InvalidField(error.field.removeprefix("plan."), error.detail) from None
        if reason := self.memory_model.over_budget(experts_per_layer, self.budget_bytes):
            raise InvalidField("experts_per_layer", reason)

    @property
    def sweep_room(self) -> int:
        """Tokens the profile's sweep may generate within the context window."""
        return max(0, self.max_context - len(SWEEP_PROMPT))

    # --- generation -------------------------------------------------------------
    def tokenize(self, text: str) -> tuple[int, ...]:
        return self.text.encode(text)

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
        room = self.max_context - len(request.prompt_ids)
        finish = "length" if request.max_new_tokens <= room else "context_full"
        sequence = sequence_for(request, min(request.max_new_tokens, room))
        steps = self.scheduler.generate(sequence, cancelled)
        first = next(steps)  # waits for a row (raising Busy or Cancelled), then the prefill's token
        yield from stream_chunks(_prepend(first, steps), self.text, request, finish, self.stats, cancelled,
                                 enqueued, sequence.joined_ns)

    def _between_steps(self) -> None:
        """Between forward passes (step lock held): see ``VirtualExperts.between_passes``."""
        self.runtime.between_passes(self.plan.update_frequency)

    def _joining(self) -> None:
        """A generation joins the batch (step lock held): with the plan's slots, whatever a
        profile's measurement left before it, and the start of a new input."""
        self._back_to_plan()
        self.runtime.begin_input()

    def _back_to_plan(self) -> None:
        """Slots a profile's measurement left become the plan's again, loaded before anything runs
        on them, so a generation has the experts it would have had without the profile (step lock held)."""
        if tuple(self.plan.experts_per_layer) != self.achieved or self.plan.strategy is not self.runtime.strategy:
            self._apply_residency(self.plan)
            self.runtime.wait_for_loads()
            self.runtime.poll()

    def close(self) -> None:
        self.scheduler.close()
        self.plans.close()
        self.runtime.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _prepend(first, rest: Iterator) -> Iterator:
    """``first``, then ``rest``; closing this closes ``rest``."""
    with contextlib.closing(rest):
        yield first
        yield from rest


def _device_info(device: str) -> DeviceInfo:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return DeviceInfo("cuda", props.name, props.total_memory, os.cpu_count() or 1, socket.gethostname())
    return DeviceInfo("cpu", platform.processor() or platform.machine(), psutil.virtual_memory().total,
                      len(os.sched_getaffinity(0)), socket.gethostname())
