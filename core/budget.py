"""The budget arithmetic: how many bytes a plan needs, and which plans fit a budget.

An executor accounts for its model's dense weights, a ``Reserve`` that does not depend on the
plan (staging buffers for expert loads, the KV cache and activations of its longest context,
and what the executor allocates beyond these tensors), the bytes of each sequence decoded
beside the first (its KV cache with slack and a row of logits), and the slots its plan keeps
per layer. ``MemoryModel`` is that sum (the paper's E_memory, section 3.3, with batch rows): the
executor checks plans and budgets with it, and the planner searches with the same one, built
from what the executor reports at registration. Rows and experts compete for the same bytes:
a plan names its rows (0: a full batch, ``--max-batch``); it is accepted when it fits with one
sequence, and the batch takes what the budget leaves, up to the plan's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from swapmoe.core.errors import InvalidField
from swapmoe.core.layout import ModelLayout
from swapmoe.core.limits import MAX_BYTES
from swapmoe.core.plan import DEFAULT_UPDATE_FREQUENCY, Plan
from swapmoe.core.sizes import format_size


@dataclass(frozen=True, slots=True)
class Reserve:
    """Bytes an executor holds whatever its plan, besides the dense weights."""

    staging_bytes: int = 0  # buffers that expert loads pass through
    kv_cache_bytes: int = 0  # keys and values for the longest context
    activation_bytes: int = 0  # workspace of one forward pass over the longest context
    batch_bytes: int = 0  # KV cache (with its slack) and logits of a full batch's other sequences
    runtime_bytes: int = 0  # the executor's own allocations for one sequence (executor.memory.runtime_bytes)
    # Each sequence past the first (batch_bytes is max_rows - 1 of them); 0 from an executor that
    # does not say, whose plans then leave room for its full batch.
    sequence_bytes: int = 0

    @property
    def one_sequence_bytes(self) -> int:
        """Everything a plan leaves room for with one sequence."""
        return self.staging_bytes + self.kv_cache_bytes + self.activation_bytes + self.runtime_bytes

    @property
    def total_bytes(self) -> int:
        """Everything a plan leaves room for: a full batch."""
        return self.one_sequence_bytes + self.batch_bytes

    @property
    def max_rows(self) -> int:
        """The executor's full batch (``--max-batch``); 1 when it does not say its sequence bytes."""
        return 1 + self.batch_bytes // self.sequence_bytes if self.sequence_bytes else 1

    def rows_bytes(self, rows):
        """Bytes of the sequences past the first at ``rows`` (0: a full batch); an int or an array."""
        full = rows == 0
        if not self.sequence_bytes:
            return (rows != 1) * self.batch_bytes
        return full * self.batch_bytes + (1 - full) * (rows - 1) * self.sequence_bytes


@dataclass(frozen=True, slots=True)
class MemoryModel:
    """E_memory of one executor: dense weights + reserve + the plan's expert slots. A budget is
    at most the device's memory (``device_bytes``; 0 when unknown: ``MAX_BYTES``)."""

    layout: ModelLayout
    reserve: Reserve
    device_bytes: int = 0

    @property
    def fixed_bytes(self) -> int:
        """What every plan needs before its first expert."""
        return self.layout.dense_bytes + self.reserve.total_bytes

    def plan_bytes(self, experts_per_layer: Sequence[int], rows=0, precision: Sequence[str] = ()) -> int:
        """E_memory: a plan's bytes with ``rows`` sequences (0: a full batch) and its experts at
        ``precision`` (per layer; empty: the checkpoint's). Arrays of columns (``experts_per_layer``
        [layers, N], ``rows`` [N]) give one figure per plan."""
        return (self.layout.dense_bytes + self.reserve.one_sequence_bytes + self.reserve.rows_bytes(rows)
                + self.layout.expert_bytes(experts_per_layer, precision))

    def rows_within(self, experts_per_layer: Sequence[int], budget: int, precision: Sequence[str] = ()) -> int:
        """The most sequences ``budget`` holds beside ``experts_per_layer`` (at most a full batch;
        at least one: plans are checked for one)."""
        if not self.reserve.sequence_bytes:  # an executor that does not say: its max_rows is 1
            return 1
        spare = budget - self.plan_bytes(experts_per_layer, 1, precision)
        return max(1, min(self.reserve.max_rows, 1 + spare // self.reserve.sequence_bytes))

    @property
    def smallest_plan_bytes(self) -> int:
        """One expert per layer at its smallest precision beside a full batch: the least budget an
        even split is sized for."""
        return self.plan_bytes([1] * self.layout.num_layers, 0, self.layout.smallest_precision)

    @property
    def min_budget_bytes(self) -> int:
        """One expert per layer (a layer with none cannot route) at its smallest precision, and one
        sequence: the least budget a plan is searched for; below a plan's rows, the executor runs
        fewer sequences at once."""
        return self.plan_bytes([1] * self.layout.num_layers, 1, self.layout.smallest_precision)

    def precision_within(self, budget: int, precision: Sequence[str] = ()) -> tuple[str, ...]:
        """``precision`` (per layer; empty: the checkpoint's) when one expert per layer at it fits
        ``budget`` with one sequence, else each layer's smallest: the least a budget cut changes."""
        if not self.over_budget([1] * self.layout.num_layers, budget, precision):
            return tuple(precision)
        smallest = self.layout.smallest_precision
        return smallest if any(smallest) else ()

    def check_budget(self, budget: int) -> None:
        """Raise InvalidField naming ``budget_bytes`` when ``budget`` cannot hold any plan, or is more
        memory than the device has."""
        if budget > (limit := self.device_bytes or MAX_BYTES):
            holder = "this device's memory" if self.device_bytes else "the largest budget allowed"
            raise InvalidField("budget_bytes", f"{format_size(budget)} ({budget} bytes) is above {holder}, "
                                               f"{format_size(limit)} ({limit} bytes)")
        if budget < self.min_budget_bytes:
            raise InvalidField(
                "budget_bytes",
                f"{format_size(budget)} is below this model's minimum of {format_size(self.min_budget_bytes)} "
                f"({self.min_budget_bytes} bytes: dense weights, one expert per layer at its smallest precision, "
                "KV cache, activations "
                "and the executor's own allocations)",
            )

    def over_budget(self, experts_per_layer: Sequence[int], budget: int, precision: Sequence[str] = ()) -> str:
        """Why a plan does not fit ``budget`` with one sequence, or "" when it does (the batch then
        runs as many sequences as the rest of the budget holds)."""
        need = self.plan_bytes(experts_per_layer, 1, precision)
        if need <= budget:
            return ""
        return (f"plan needs {format_size(need)} ({need} bytes) but the budget is "
                f"{format_size(budget)} ({budget} bytes)")

    def fit(self, budget: int, one_sequence: bool = False, precision: Sequence[str] = ()) -> tuple[int, ...]:
        """The most experts per layer (at ``precision``) that ``budget`` holds beside a full batch
        (or one sequence), spread evenly."""
        return even_split(self.layout.at(precision),
                          budget - self.plan_bytes([0] * self.layout.num_layers, 1 if one_sequence else 0))

    def shrink(self, experts_per_layer: Sequence[int], budget: int,
               precision: Sequence[str] = ()) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """(experts per layer, precision) cut down to what ``budget`` holds with one sequence: a
        budget cut takes sequences out of the batch first, then experts, and lowers the precision
        only where one expert per layer at it no longer fits (the planner may then answer with a
        plan that lowers precision instead of the count)."""
        if not self.over_budget(experts_per_layer, budget, precision):
            return tuple(experts_per_layer), tuple(precision)
        precision = self.precision_within(budget, precision)
        fit = self.fit(budget, one_sequence=True, precision=precision)
        return tuple(min(a, b) for a, b in zip(fit, experts_per_layer)), precision

    def default_plan(self, budget: int, version: int, origin: str, precision: str = "") -> Plan:
        """The plan to run before a better one is known: an even split of the budget, with every
        layer's experts at ``precision`` ("": the checkpoint's) where one expert per layer fits it."""
        if precision:
            self.layout.layers[0].bytes_at(precision)  # KeyError for a precision the layers are not kept at
        precision = self.precision_within(budget, (precision,) * self.layout.num_layers if precision else ())
        return Plan(version, self.fit(budget, precision=precision), DEFAULT_UPDATE_FREQUENCY, origin=origin,
                    precision=precision)


def even_split(layout: ModelLayout, expert_bytes_available: int) -> tuple[int, ...]:
    """Experts per layer that fit ``expert_bytes_available``, spread as evenly as possible: one
    more expert per layer, round after round, in layer order, while each fits.

    Every layer keeps at least one expert (a layer with none cannot route), so the result
    may exceed the bytes given when they cannot hold one per layer; callers compare against
    the minimum budget first. Whole rounds are counted by bisection, so the work grows with
    the number of layers, not of experts or bytes.
    """
    counts = [1] * layout.num_layers
    left = expert_bytes_available - layout.expert_bytes(counts)
    while True:
        growing = [i for i, spec in enumerate(layout.layers)
                   if counts[i] < spec.num_experts and spec.bytes_per_expert <= left]
        if not growing:
            return tuple(counts)

        def cost(rounds: int) -> int:
            return sum(min(rounds, layout.layers[i].num_experts - counts[i]) * layout.layers[i].bytes_per_expert
                       for i in growing)

        low, high = 0, max(layout.layers[i].num_experts - counts[i] for i in growing)
        while low < high:  # the most whole rounds that fit
            mid = (low + high + 1) // 2
            low, high = (mid, high) if cost(mid) <= left else (low, mid - 1)
        if low:
            left -= cost(low)
            for i in growing:
                counts[i] += min(low, layout.layers[i].num_experts - counts[i])
            continue
        for i in growing:  # a partial round: at least one layer no longer fits, and drops out
            if layout.layers[i].bytes_per_expert <= left:
                counts[i] += 1
                left -= layout.layers[i].bytes_per_expert
