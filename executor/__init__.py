"""``swapmoe.executor``: the on-device process. It loads a Hugging Face MoE checkpoint within its
memory budget and serves it over gRPC.

The data path, outside in: ``server`` (gRPC) -> ``engine`` (composes the rest; ``Engine.step``
is one serving step, which ``serving_loop`` runs on the forward thread) -> ``step`` (schedule ->
run -> postprocess, the one decode path) over ``scheduler`` (who runs in the next pass: pure
bookkeeping) and ``model_runner`` (the pass: ``kv_batch``, the batch's KV cache, sampling, the
experts' work between passes); ``plans`` (which plan, which budget) -> ``virtual_experts`` (the
model with k slots per MoE layer) -> ``slots`` (which expert is in which slot), ``slot_experts``
(routing into slots), ``gating`` (masked gating, importance), ``updater`` (deciding updates off
the forward thread), ``loader`` (background loads) and ``store`` (the expert store on disk).
``skeleton``, ``adapters`` and ``checkpoint`` build the model; ``requests``,
``sampling`` and ``text`` make tokens and text; ``device_profiling`` measures the device through the same
step; ``telemetry``, ``metrics`` and ``prometheus`` report; ``planner_link`` dials out to the
planner.
"""
