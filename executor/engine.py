"""The executor's engine: one model, its virtual experts, its budget, its plan.

It composes the pieces and owns no policy of its own: ``VirtualExperts`` (the model with
budgeted expert slots), ``PlanBook`` (which plans fit the budget, the saved plan),
``Scheduler`` (who runs in the next pass), ``ModelRunner`` (the pass itself) and
``TextCodec`` (tokens in and out). ``step`` is the serving loop's body: commands (plans,
budgets) first, then schedule -> run -> postprocess; ``ServingLoop`` runs it on the forward
thread. The model never exists whole in memory: dense weights plus each layer's slots, sized by
the plan within the budget.
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from swapmoe.core.budget import MemoryModel, Reserve
from swapmoe.core.errors import InvalidField
from swapmoe.core.layout import ModelLayout
from swapmoe.core.memory import MemoryReport
from swapmoe.core.plan import BudgetChange, Plan, PlanResult, validate_plan
from swapmoe.core.sizes import format_size
from swapmoe.executor import memory
from swapmoe.executor.requests import GenerationRequest
from swapmoe.executor.loader import LoadCounters
from swapmoe.executor.metrics import ServingStats
from swapmoe.executor.plans import PlanBook
from swapmoe.executor.device_profiling import SWEEP_PROMPT, Identity, ProfileProgress, ProfileSpec, measure_threads, profile
from swapmoe.executor.intra_op import IntraOpThreads
from swapmoe.executor.model_runner import ModelRunner
from swapmoe.executor.scheduler import Scheduler, Sequence
from swapmoe.executor.serving_loop import ServingLoop
from swapmoe.executor.step import step as one_step
from swapmoe.executor.telemetry import EventKind, TelemetryHub
from swapmoe.executor.text import Chunk, TextCodec, stream_chunks
from swapmoe.executor.swap_stats import LayerActivity
from swapmoe.executor.virtual_experts import VirtualExperts

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
    # torch intra-op threads; 0: by measurement (``executor.intra_op``: the last device profile's choice, else a probe).
    threads: int = 0
    precision: str = ""  # of the experts in the starting plan, until a plan says otherwise ("": the checkpoint's)
    dense_precision: str = ""  # of the weights outside the routed experts (``executor.lowered_dense``)


class Engine:
    def __init__(self, config: EngineConfig, hub: TelemetryHub | None = None):
        self.config = config
        self.hub = hub or TelemetryHub(config.node_id)
        self.experts = VirtualExperts(config.model_dir, config.device, config.store_root,
                                      max_loads_per_update=config.max_loads_per_update,
                                      load_bandwidth=config.load_bandwidth or None,
                                      dense_precision=config.dense_precision)
        try:
            self.text = TextCodec(config.model_dir, self.model)
            limit = self.layout.max_positions or DEFAULT_MAX_CONTEXT
            if self.layout.max_positions and config.max_context > limit:
                raise InvalidField("max_context", f"{config.max_context} is above the model's {limit} positions")
            self.max_context = config.max_context or min(limit, DEFAULT_MAX_CONTEXT)
            dtype_bytes = next(self.model.parameters()).element_size()
            self.device_info = memory.device_info(config.device)
            self.runner = ModelRunner(self.model, self.experts, config.max_batch, before_join=self._back_to_plan)
            kv = memory.kv_cache_bytes(self.model.config, self.max_context, dtype_bytes)
            activations = lambda rows: memory.activation_bytes(self.model.config, self.max_context,  # noqa: E731
                                                               dtype_bytes, rows)
            # Each sequence past the first: its KV cache with the cache's growth slack, and a row of
            # logits. A plan names its rows (0: a full batch); one that fits with one sequence is
            # accepted, and the batch takes the rest, up to the plan's rows.
            self.sequence_bytes = kv + memory.kv_slack_bytes(kv) + activations(2) - activations(1)
            self.memory_model = MemoryModel(self.layout, Reserve(
                self.experts.staging_bytes, kv, activations(1), (self.runner.capacity - 1) * self.sequence_bytes,
                memory.runtime_bytes(kv), sequence_bytes=self.sequence_bytes,
            ), self.device_info.memory_bytes)
            self.plans = PlanBook(self.memory_model, config.budget_bytes, config.state_dir, config.precision)
            note = self.plans.resume()
            self.stats = ServingStats()
            self._budget_watchers: list[Callable[[BudgetChange], None]] = []
            self.scheduler = Scheduler(self.runner.capacity, config.max_queue, frozenset(self.text.eos))
            self.loop = ServingLoop(self.scheduler, self.step)
            self.loop.call(lambda: self._apply_residency(self.plan))  # see intra_op.single_threaded
            self.threads = IntraOpThreads(config.threads, config.state_dir, self.model_fingerprint, config.device)
            self.loop.call(self.threads.start(measure_threads, self.experts).apply)  # on the forward thread
            self.experts.forget_traffic()  # a start-up probe's passes are not traffic
            self.scheduler.resize(self.batch_rows(self.budget_bytes, self.plan))
            self.hub.event(EventKind.STARTED, f"serving {self.layout.model_class} from {config.model_dir}; {note}; "
                           f"{self.threads.setting.reason}", plan_version=self.plan.version)
        except BaseException:
            self.experts.close()  # a budget below the minimum, an unreadable tokenizer: leave no loader thread
            getattr(self, "loop", None) and self.loop.close()  # nor a forward thread
            raise

    # --- what it serves -------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self.experts.model

    @property
    def layout(self) -> ModelLayout:
        return self.experts.layout

    @property
    def model_fingerprint(self) -> str:
        """The checkpoint's content hash, taken once when its expert store was built."""
        return self.experts.store.manifest.model_fingerprint

    @property
    def plan(self) -> Plan:
        return self.plans.current

    @property
    def budget_bytes(self) -> int:
        return self.plans.budget_bytes

    @property
    def achieved(self) -> tuple[int, ...]:
        """Slots per layer now: what the plan in force achieved."""
        return self.experts.capacities

    @property
    def min_budget_bytes(self) -> int:
        return self.memory_model.min_budget_bytes

    def batch_rows(self, budget: int, plan: Plan) -> int:
        """Sequences decoded together under ``plan`` and ``budget``: the plan's rows (0: a full batch)
        within the batch's capacity and what the budget holds beside the plan's experts (at least
        one: plans are checked for one)."""
        capacity = self.scheduler.capacity
        return max(1, min(capacity, plan.rows or capacity,
                          self.memory_model.rows_within(plan.experts_per_layer, budget, plan.precision)))

    def _rows_capped(self, plan: Plan) -> str:
        """Why ``plan`` runs fewer rows than it names whatever the budget, or "" when it does not."""
        capacity = self.scheduler.capacity
        if plan.rows <= capacity:
            return ""
        if capacity == self.config.max_batch:
            return f"rows {plan.rows} capped at --max-batch {capacity}"
        return (f"rows {plan.rows} capped at {capacity}: this model decodes one sequence at a time "
                "(encoder-decoder or sliding-window attention)")

    def memory(self) -> MemoryReport:
        reserve, rows = self.memory_model.reserve, self.scheduler.limit
        kv, slack = reserve.kv_cache_bytes, memory.kv_slack_bytes(reserve.kv_cache_bytes)
        return MemoryReport(
            budget_bytes=self.budget_bytes,
            dense_bytes=self.layout.dense_bytes,
            expert_bytes=self.experts.slot_bytes() + reserve.staging_bytes,
            kv_cache_bytes=kv * rows,
            activation_bytes=reserve.activation_bytes + (rows - 1) * (self.sequence_bytes - kv - slack),
            runtime_bytes=reserve.runtime_bytes + (rows - 1) * slack,
            process_rss_bytes=memory.process_rss(),
            process_peak_rss_bytes=memory.process_peak_rss(),
        )

    # --- plans and budgets ------------------------------------------------------
    def apply_plan(self, plan: Plan) -> PlanResult:
        """ACK or NACK a well-formed plan; raises InvalidField for a malformed one. Applied at the
        top of a step, between two passes."""
        start = time.perf_counter_ns()
        validate_plan(plan, self.layout)
        previous, reason, unsaved, rows = self.loop.call(lambda: self._apply_plan(plan))
        if not reason and self.budget_bytes != previous:
            self.hub.event(EventKind.BUDGET_CHANGED,
                           f"budget {format_size(previous)} -> {format_size(self.budget_bytes)}: with plan {plan.version}",
                           previous_budget_bytes=previous, budget_bytes=self.budget_bytes)
        if reason:
            self.hub.event(EventKind.PLAN_REJECTED, reason, plan_version=plan.version)
            return PlanResult(plan.version, False, reason, memory=self.memory())
        capped = self._rows_capped(plan)
        notes = (capped, unsaved and f"applied, but {unsaved}: a restart meanwhile resumes an older plan")
        self.hub.event(EventKind.PLAN_APPLIED, f"plan {plan.version} applied: {list(self.achieved)}, {rows} rows"
                       + "".join(f"; {note}" for note in (capped, unsaved) if note), plan_version=plan.version)
        return PlanResult(plan.version, True, "; ".join(n for n in notes if n), self.achieved, self.memory(),
                          time.perf_counter_ns() - start, achieved_rows=rows)

    def _apply_plan(self, plan: Plan) -> tuple[int, str, str, int]:
        """(the budget before, why the plan is refused or "", why it is not saved yet or "", the
        rows decoded together from now on)."""
        self.plans.check_step(plan)
        previous = self.budget_bytes
        if reason := self.plans.review(plan):
            return previous, reason, "", self.scheduler.limit
        unsaved = self._transition(plan.budget_bytes or previous, plan, lambda: self.plans.accept(plan))
        return previous, "", unsaved, self.scheduler.limit

    def set_budget(self, budget: int, reason: str = "") -> int:
        """Apply a new budget at the top of the next step, taking rows out of the batch, then
        shrinking the plan, as far as it no longer fits; returns the old budget."""
        self.memory_model.check_budget(budget)

        def change() -> int:
            previous, shrunk = self.budget_bytes, self.plans.shrunk_for(budget)
            self._transition(budget, shrunk or self.plan, lambda: self.plans.adopt(shrunk or self.plan))
            return previous

        previous = self.loop.call(change)
        self.hub.event(EventKind.BUDGET_CHANGED,
                       f"budget {format_size(previous)} -> {format_size(budget)}" + (f": {reason}" if reason else ""),
                       previous_budget_bytes=previous, budget_bytes=budget)
        for watcher in list(self._budget_watchers):
            watcher(BudgetChange(previous, budget, reason))
        return previous

    def _transition(self, budget: int, plan: Plan, adopt: Callable[[], str]) -> str:
        """Move to ``plan`` under ``budget`` in the one order that keeps the budget's promise (the
        bytes accounted never exceed the budget in force): rows the new budget does not hold
        leave, a growing budget takes effect, the slots change, the plan is adopted (``adopt``,
        whose note is returned), a shrinking budget takes effect, rows it holds may join. Runs on
        the forward thread, between two passes."""
        previous, rows = self.budget_bytes, self.batch_rows(budget, plan)
        self.runner.leave(self.scheduler.resize(min(self.scheduler.limit, rows)))
        if budget > previous:
            self.plans.set_budget(budget)
        self._apply_residency(plan)
        note = adopt()
        if budget < previous:
            self.plans.set_budget(budget)
        self.runner.leave(self.scheduler.resize(rows))
        return note

    def on_budget_change(self, watcher: Callable[[BudgetChange], None]) -> Callable[[], None]:
        """Call ``watcher`` after each budget change not carried by a plan (a plan's budget is in its
        result); returns what stops the calls."""
        self._budget_watchers.append(watcher)
        return lambda: self._budget_watchers.remove(watcher) if watcher in self._budget_watchers else None

    def _apply_residency(self, plan: Plan) -> None:
        """Give each layer the plan's slots (shrinking keeps the most important experts) and its
        strategy and update frequency. On the forward thread, between two passes."""
        self.runner.update_frequency = plan.update_frequency
        if plan.strategy is not self.experts.strategy:
            self.experts.set_strategy(plan.strategy)
        if tuple(plan.experts_per_layer) != self.experts.capacities or plan.precisions != self.experts.precisions:
            self.experts.resize(plan.experts_per_layer, plan.precisions)

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
        return self.loop.call(self.experts.activity)

    def load_counters(self) -> LoadCounters:
        """Cumulative expert loads, bytes read and seconds spent reading."""
        return self.experts.io.snapshot()

    @property
    def load_tier(self) -> str:
        return self.experts.tier

    @property
    def queue_depth(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def running(self) -> int:
        """Generations in the batch, plus a profile in progress."""
        return self.loop.running

    def profile(self, spec: ProfileSpec, cancelled: Callable[[], bool] = lambda: False) -> Iterator[ProfileProgress]:
        """Measure this device and model (``executor.device_profiling``), one short measurement at a time,
        each in its turn in the generation queue (no generation shares the cores meanwhile): the
        generations that arrive while one runs are served before the next, so a long profile delays
        a request by one measurement, not by the whole profile. Raises InvalidField for a sweep
        residency that cannot run or does not fit the budget, Cancelled when ``cancelled()`` turns true."""
        if spec.experts_per_layer:
            self.check_residency(spec.experts_per_layer)
        identity = Identity(self.config.node_id, self.device_info, self.model_fingerprint)

        def sweep(precision: tuple[str, ...] | None = None) -> tuple[int, ...] | None:
            """Asked at each measurement (plans and budgets change between two): the residency the budget
            holds at ``precision`` (None: the plan's), None when not even one expert per layer fits at it."""
            wanted = self.plan.precisions if precision is None else precision
            experts, fits = self.memory_model.shrink(spec.experts_per_layer or self.plan.experts_per_layer,
                                                     self.budget_bytes, wanted)
            return experts if (fits or ("",) * len(wanted)) == tuple(wanted) else None

        sweep.plan_precisions = lambda: self.plan.precisions  # what a measurement at other precisions goes back to

        with self.loop.exclusive(cancelled) as measurement:
            try:
                yield from self.threads.adopting(profile(self.experts, spec, identity, sweep, cancelled, measurement,
                                                         self.scheduler.limit, self.config.threads), self.keep_state, self.loop.call)
            finally:  # however it ended, the slots are the plan's again
                self.loop.call(self._back_to_plan)

    def check_residency(self, experts_per_layer: tuple[int, ...]) -> None:
        """InvalidField (``experts_per_layer...``) unless the layout can run it within the budget."""
        try:
            validate_plan(Plan(0, tuple(experts_per_layer)), self.layout)
        except InvalidField as error:
            raise InvalidField(error.field.removeprefix("plan."), error.detail) from None
        if reason := self.memory_model.over_budget(experts_per_layer, self.budget_bytes, self.plan.precision):
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
        sequence = Sequence(request, min(request.max_new_tokens, room))
        steps = self.loop.generate(sequence, cancelled)
        first = next(steps)  # waits for a row (raising Busy or Cancelled), then the prefill's token
        yield from stream_chunks(_prepend(first, steps), self.text, request, finish, self.stats, cancelled,
                                 enqueued, sequence.joined_ns)

    def step(self) -> bool:
        """One step of serving, on the forward thread: the commands waiting (plans, budgets), then
        schedule -> run -> postprocess, and the tokens go to their streams. False when it had
        nothing to do."""
        self.loop.run_commands()
        emitted = one_step(self.scheduler, self.runner, self.loop.guard)
        if emitted is None:
            return False
        self.loop.deliver(emitted)
        return True

    def _back_to_plan(self) -> None:
        """Before a prefill: slots a profile's measurement left become the plan's again, loaded
        before anything runs on them, so a generation has the experts it would have had without
        the profile (on the forward thread)."""
        if (tuple(self.plan.experts_per_layer) != self.achieved or self.plan.strategy is not self.experts.strategy
                or self.plan.precisions != self.experts.precisions):
            self._apply_residency(self.plan)
            self.experts.wait_for_loads()
            self.experts.poll()

    def close(self) -> None:
        self.loop.close()
        self.plans.close()
        self.experts.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _prepend(first, rest: Iterator) -> Iterator:
    """``first``, then ``rest``; closing this closes ``rest``."""
    with contextlib.closing(rest):
        yield first
        yield from rest
