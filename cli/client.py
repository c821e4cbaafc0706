"""Client-side helpers behind the ``swapmoe`` commands: call a server, print what it says."""

from __future__ import annotations

import itertools
import json
import sys

import grpc
from google.protobuf import json_format

from swapmoe.core.sizes import format_size
from swapmoe.rpc import convert, transport
from swapmoe.v1 import common_pb2, executor_pb2 as epb, executor_pb2_grpc, planner_pb2 as ppb, planner_pb2_grpc


# TLS and the token the CLI's calls carry (``swapmoe.rpc.security``), set once by the CLI.
security = None


def channel(address: str) -> grpc.Channel:
    """A channel to ``address`` with the command's TLS and token, if any."""
    return transport.channel(address, security)


def executor_stub(address: str) -> executor_pb2_grpc.ExecutorServiceStub:
    return executor_pb2_grpc.ExecutorServiceStub(channel(address))


def stream_generation(target, prompt: str, out=None, model: str = "", selector: str = "",
                      **params) -> epb.GenerateResponse:
    """Print tokens as they arrive, after the prompt they continue (a seq2seq model's answer stands
    alone); returns the final chunk (finish reason, usage, timings). ``target`` is an executor's
    address, or a ``routing.Router``: then the least-loaded healthy executor serving ``model``
    (and matching the label ``selector``) answers."""
    out = out or sys.stdout  # looked up now: a redirected stdout gets it
    sampling = epb.SamplingParams(temperature=params.get("temperature", 0.0), top_p=params.get("top_p", 1.0),
                                  top_k=params.get("top_k", 0))
    if params.get("seed") is not None:
        sampling.seed = params["seed"]
    request = epb.GenerateRequest(text=prompt, max_new_tokens=params.get("max_new_tokens", 64), sampling=sampling,
                                  stop=params.get("stop", []))
    if isinstance(target, str):
        stub = executor_stub(target)
        chunks = iter(stub.Generate(request, timeout=300))
        first = None
    else:  # a Router: the executor is known once it answers
        chunks = target.generate(model, request, selector=selector)
        first = next(chunks, None)
        stub = target.executor_stub(chunks.node.status.executor_address) if chunks.node else None
    if stub is None or not stub.Describe(epb.DescribeRequest(), timeout=30).layout.encoder_decoder:
        out.write(prompt)
    last = None
    for chunk in itertools.chain([first] if first is not None else [], chunks):
        out.write(chunk.text)
        out.flush()
        last = chunk
    out.write("\n")
    t = last.timings
    print(f"[{epb.FinishReason.Name(last.finish_reason)}] {last.usage.completion_tokens} tokens, "
          f"first token {t.time_to_first_token_ns / 1e6:.1f} ms, "
          f"{1e9 / t.mean_inter_token_ns if t.mean_inter_token_ns else 0:.1f} tokens/s", file=out)
    return last


def print_json(message, out=None) -> None:
    """``message`` in proto3's JSON mapping (as grpcurl prints it: camelCase names, 64-bit integers
    as strings), with every field, zeros and empty lists included, so scripts need no defaults."""
    fields = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    print(json.dumps(fields, indent=2), file=out or sys.stdout)


def memory_line(m: common_pb2.MemoryReport) -> str:
    return (f"accounted {format_size(m.accounted_bytes)} of budget {format_size(m.budget_bytes)} "
            f"(dense {format_size(m.dense_bytes)}, experts {format_size(m.expert_bytes)}, "
            f"KV {format_size(m.kv_cache_bytes)}, activations {format_size(m.activation_bytes)}, "
            f"executor's own {format_size(m.runtime_bytes)}); "
            f"process RSS {format_size(m.process_rss_bytes)}")


def plan_extras(plan) -> str:
    """A plan's rows and precision as printed after its experts (a Plan or its proto): nothing for
    rows 0 (a full batch) or the checkpoint's precision everywhere ("-" for it in a layer)."""
    rows = f" rows={plan.rows}" if plan.rows else ""
    precision = f" precision={','.join(p or '-' for p in plan.precision)}" if any(plan.precision) else ""
    return rows + precision


def print_description(address: str, as_json: bool = False) -> None:
    d = executor_stub(address).Describe(epb.DescribeRequest(), timeout=30)
    if as_json:
        return print_json(d)
    layout = d.layout
    print(f"node {d.node_id} on {d.device.kind} ({d.device.name})")
    print(f"model {layout.model_class} ({layout.architecture}, {layout.dtype}): {len(layout.layers)} MoE layers, "
          f"{format_size(layout.total_bytes)} in full, dense {format_size(layout.dense_bytes)}")
    for layer in layout.layers:
        lower = "".join(f", {p.precision} {format_size(p.bytes_per_expert)}" for p in layer.precisions)
        print(f"  layer {layer.index} {layer.module}: {layer.num_experts} experts x "
              f"{format_size(layer.bytes_per_expert)}{lower}, top-{layer.top_k}, resident "
              f"{d.achieved_experts_per_layer[layer.index]}")
    print(f"budget {format_size(d.budget_bytes)} (minimum {format_size(d.min_budget_bytes)}); plan v{d.plan.version} "
          f"{list(d.plan.experts_per_layer)}{plan_extras(d.plan)} from {d.plan.origin!r}")
    print(memory_line(d.memory))


def set_budget(address: str, budget: int, reason: str = "", as_json: bool = False) -> None:
    r = executor_stub(address).SetBudget(epb.SetBudgetRequest(budget_bytes=budget, reason=reason), timeout=30)
    if as_json:
        return print_json(r)
    print(f"budget {format_size(r.previous_budget_bytes)} -> {format_size(r.budget_bytes)}; "
          f"resident experts {list(r.achieved_experts_per_layer)}")
    print(memory_line(r.memory))


def print_plan_status(address: str, node_ids: list[str], out=None, as_json: bool = False) -> None:
    """Per executor: the plan, what the models predict for it and what was last measured, the
    workload recognised, and why the plan was sent."""
    out = out or sys.stdout
    stub = planner_pb2_grpc.PlannerServiceStub(channel(address))
    response = stub.GetPlanStatus(ppb.PlanStatusRequest(node_ids=node_ids), timeout=30)
    if as_json:
        return print_json(response, out)
    for s in response.executors:
        plan = convert.plan_from_pb(s.desired_plan)
        print(f"{s.node_id}: {'connected' if s.connected else 'away'}, budget {format_size(s.budget_bytes)}, "
              f"plan v{plan.version} {list(plan.experts_per_layer)}{plan_extras(plan)} f={plan.update_frequency} "
              f"{plan.strategy.value} {ppb.PlanState.Name(s.state).removeprefix('PLAN_STATE_')}"
              f"{' pinned' if s.pinned else ''}", file=out)
        print(f"  workload: {s.workload or '(not recognised yet)'}; device profile: {s.profile_state}", file=out)
        if s.HasField("predicted"):
            p = s.predicted
            load = f" at {p.offered_load} streams ({p.throughput:.1f} tokens/s in all)" if p.offered_load > 1 else ""
            print(f"  predicted: {p.accuracy_metric} {p.accuracy:.4g} on {p.workload}, {p.inter_token_ns / 1e6:.2f} ms "
                  f"between tokens per stream ({p.tokens_per_second:.1f} tokens/s){load}, "
                  f"{format_size(p.memory_bytes)}", file=out)
        if s.HasField("throughput"):
            t = s.throughput
            print(f"  measured: {t.tokens_per_second:.1f} tokens/s, inter-token p50 {t.inter_token_p50_ns / 1e6:.2f} ms "
                  f"p99 {t.inter_token_p99_ns / 1e6:.2f} ms; {t.running} running, {t.queue_depth} waiting", file=out)
        if s.HasField("memory"):
            print(f"  memory: {memory_line(s.memory)}", file=out)
        print(f"  why: {s.reason or '(adopted the plan the executor ran)'}", file=out)
    if response.unsaved_records:
        print(f"planner state: {response.unsaved_records} records not written to disk ({response.state_error}); "
              f"kept in memory and written again until they are", file=out)


def fetch_device_profile(executor: str | None = None, planner: str | None = None, node_id: str | None = None,
                         repeats: int = 5, sweep_tokens: int = 48, out=None):
    """Profile an executor's device: by calling it (showing its progress), or, for an executor
    that dialled out to ``planner``, by asking the planner to ask it down its Connect stream.
    Returns a ``swapmoe.core.device_profile.DeviceProfile``."""
    from swapmoe.rpc import bounds, convert
    from swapmoe.v1 import planner_pb2_grpc

    out = out or sys.stderr  # progress; looked up now, so a redirected stderr gets it
    request = epb.ProfileRequest(repeats=repeats, sweep_tokens=sweep_tokens)
    try:
        if executor:
            result = None
            for progress in executor_stub(executor).Profile(request, timeout=1800):
                out.write(f"\r{progress.fraction:6.1%} {progress.stage:<60}")
                out.flush()
                if progress.HasField("result"):
                    result = progress.result
            out.write("\n")
        else:
            if not node_id:
                raise ValueError("--planner needs --node-id: the executor to profile")
            stub = planner_pb2_grpc.PlannerServiceStub(channel(planner))
            out.write(f"asking {node_id} through the planner at {planner} (no progress on this path)...\n")
            result = stub.ProfileExecutor(ppb.ProfileExecutorRequest(node_id=node_id, request=request, timeout_s=1800),
                                          timeout=1860).result
    except grpc.RpcError as error:
        where = f"executor {executor}" if executor else f"{node_id} through planner {planner}"
        raise ValueError(f"profiling {where} failed: {error.code().name}: {error.details()}") from None
    if result is None:
        raise ValueError("profiling failed: the executor's stream ended without a result")
    bounds.check_message(result, "result.")  # it may come from a machine the operator does not control
    return convert.device_profile_from_pb(result)
