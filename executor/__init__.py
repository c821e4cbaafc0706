"""``swapmoe.executor``: the on-device process. It loads a Hugging Face MoE checkpoint within its
memory budget and serves it over gRPC.

The data path, outside in: ``server`` (gRPC) -> ``engine`` (composes the rest) -> ``scheduler``
(who runs when: continuous batching over ``kv_batch``, the batch's KV cache) and ``plans``
(which plan, which budget) -> ``virtual_experts`` (the model with k slots per MoE layer) ->
``slots`` (which expert is in which slot), ``slot_experts`` (routing into slots), ``routing``
(masked gating, importance), ``loader`` (background loads) and ``store`` (the expert store on
disk). ``skeleton``, ``adapters`` and ``checkpoint`` build the
model; ``generation`` and ``text`` make tokens and text; ``telemetry``, ``metrics`` and
``prometheus`` report; ``planner_link`` dials out to the planner.
"""
