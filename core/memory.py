"""Memory the executor accounts for against its budget, and what the process really uses."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MemoryReport:
    budget_bytes: int
    dense_bytes: int
    expert_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    process_rss_bytes: int = 0
    process_peak_rss_bytes: int = 0
    runtime_bytes: int = 0  # the executor's own allocations (executor.memory.runtime_bytes)

    @property
    def accounted_bytes(self) -> int:
        return self.dense_bytes + self.expert_bytes + self.kv_cache_bytes + self.activation_bytes + self.runtime_bytes
