"""The device profile's precision points: one decode pass with every layer's experts at each
precision the store keeps (``executor.quantization``), beside one at the checkpoint's own.

What E_latency scales a plan's pass time by (``profiler.performance_models``): the kernels of
each precision run at their own speed (torch's int4 and int8 weight-only matmuls, bfloat16),
and only a pass through the real model says what that is worth beside the dense part. Measured
at the sweep's residency, the precisions interleaved over ``rounds`` so drift hits all alike;
the runtime's own precisions are put back afterwards.
"""

from __future__ import annotations

import statistics
from typing import Callable, ContextManager, Sequence

from swapmoe.core.device_profile import PrecisionPoint


def measure_precisions(runtime, residency: Callable[..., Sequence[int] | None], step_ns: Callable[[], int],
                       measurement: Callable[[], ContextManager], rounds: int = 3) -> tuple[PrecisionPoint, ...]:
    """A ``PrecisionPoint`` per precision ("" first, then the layout's lower ones): the median over
    ``rounds`` of ``step_ns()`` (one decode pass, loads settled) with every layer at it, each run
    inside ``measurement()`` at ``residency(precision)`` slots per layer (what the budget holds at
    it: a precision at which not even one expert per layer fits is not measured). Empty when the
    store keeps no lower precision."""
    layers, previous = len(runtime.layers), runtime.precisions
    names = tuple(n for n in ("", *runtime.layout.precisions) if residency((n,) * layers) is not None)
    if len(names) < 2:
        return ()
    samples: dict[str, list[int]] = {name: [] for name in names}
    try:
        for _ in range(max(1, rounds)):
            for name in names:
                with measurement():
                    if (experts := residency((name,) * layers)) is None:
                        continue  # a budget cut meanwhile: not at this precision
                    runtime.resize(tuple(experts), (name,) * layers)
                    runtime.wait_for_loads()
                    runtime.poll()
                    samples[name].append(step_ns())
    finally:  # back to the plan's precision as it is now (a budget cut meanwhile may have lowered it)
        plan = getattr(residency, "plan_precisions", lambda: previous)()
        with measurement():
            if (experts := residency(plan)) is not None:
                runtime.resize(tuple(experts), plan)
    return tuple(PrecisionPoint(name, max(1, int(statistics.median(s)))) for name, s in samples.items() if s)
