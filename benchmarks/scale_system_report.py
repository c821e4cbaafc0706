"""RESULTS-scale-system.md and .json from a ``benchmarks.scale_system`` run, and the searched
plans in the format ``benchmarks.scale --plans`` reads."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from swapmoe.core.sizes import format_size

@dataclass
class Step:
    """One step of the scenario: its wall time, what it measured, and its checks."""

    name: str
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    error: str = ""  # why it stopped the run, if it raised

    @property
    def passed(self) -> bool:
        return not self.error and all(self.checks.values())


def plan_json(plan) -> dict:
    """A ``common_pb2.Plan`` as the report and ``benchmarks.scale --plans`` keep it."""
    return dict(version=plan.version, experts_per_layer=list(plan.experts_per_layer),
                update_frequency=plan.update_frequency, origin=plan.origin)


def memory_figures(described) -> dict:
    """A ``DescribeResponse``'s budget and memory, as a step's figures."""
    return dict(budget=described.budget_bytes, accounted=described.memory.accounted_bytes,
                process_rss=described.memory.process_rss_bytes)


BYTES = {"budget", "accounted", "process_rss", "executor_rss", "workers_peak_rss", "tree_peak_rss"}
HIDDEN = {"directory", "saved", "first_plan", "model", "status"}  # in the JSON only


def _plan(plan: dict) -> str:
    return f"v{plan['version']} {plan['experts_per_layer']} F={plan['update_frequency']} ({plan['origin']})"


def _figure(key: str, value) -> str:
    if key in BYTES:
        return f"{key} {format_size(value)}"
    if isinstance(value, dict):
        return f"{key} {_plan(value)}"
    if isinstance(value, float):
        return f"{key} {value:.3g}"
    return f"{key} {value}"


def _one_line(text: str, most: int = 500) -> str:
    """``text`` on one line, at most ``most`` characters: its start and its end (a process's last words)."""
    text = " ".join(text.split())
    return text if len(text) <= most else f"{text[:most // 3]} ... {text[-(most - most // 3):]}"


def _row(step) -> str:
    figures = "; ".join(_figure(k, v) for k, v in step.figures.items() if k not in HIDDEN)
    checks = "; ".join(f"{'pass' if ok else '**FAIL**'}: {name}" for name, ok in step.checks.items())
    if step.error:
        checks = (checks + "; " if checks else "") + f"**FAILED**: {_one_line(step.error)}"
    return f"| {step.name} | {step.seconds:.1f} | {figures.replace('|', '/')} | {checks.replace('|', '/')} |"


def render(result: dict, steps) -> str:
    s = result["settings"]
    lines = [
        "# Paper scale: planner, profiling, plans, a live budget change, a restart and the gateway", "",
        f"`{result['command']}` on {result['machine']}. Real processes on loopback: a planner, an executor "
        f"(dialled out to it, state directory, one sequence at a time, context {s['max_context']}), "
        f"`swapmoe profile device --planner`, `swapmoe profile accuracy` on Ray with 2 workers "
        f"({s['configurations']} configurations), `swapmoe http serve`. Checkpoint `{s['checkpoint']}`, "
        f"budget {format_size(s['budget'])}, then {format_size(s['second_budget'])} while streaming.", "",
        f"**Verdict: {'PASS' if result['passed'] else 'FAIL'}** ({sum(st.passed for st in steps)} of "
        f"{len(result['steps_planned'])} steps passed).", "",
        "| step | seconds | figures | checks |", "|---|---|---|---|",
    ]
    lines += [_row(step) for step in steps]
    lines += ["", "Seconds are each step's wall time; `_s` figures are seconds inside it. The executor stays "
              "connected throughout step 4: the planner picks up a profile written meanwhile by itself.", ""]
    if result["plans"]:
        lines += [f"Searched plans (`--plans-out {result['plans_out']}`, for `benchmarks.scale --plans`):", ""]
        lines += [f"- {format_size(int(budget))}: {_plan(plan)}" for budget, plan in result["plans"].items()]
        lines.append("")
    return "\n".join(lines)


def write(settings, planned: tuple[str, ...], steps: list[Step], plans: dict, report: Path, plans_out: Path,
          argv) -> dict:
    """Write the report, its JSON and the plans; returns the JSON's content."""
    command = "python -m benchmarks.scale_system " + " ".join(str(a) for a in (argv or []))
    result = dict(
        command=command.strip(), machine=f"{platform.machine()}, {psutil.cpu_count()} cores, "
                                         f"{format_size(psutil.virtual_memory().total)}",
        settings=dict(checkpoint=str(settings.checkpoint), budget=settings.budget, second_budget=settings.second_budget,
                      configurations=settings.configurations, max_context=settings.max_context,
                      work=str(settings.work)),
        steps_planned=list(planned),
        steps=[dict(name=st.name, seconds=st.seconds, figures=st.figures, checks=st.checks, error=st.error,
                    passed=st.passed) for st in steps],
        plans=plans, plans_out=str(plans_out),
        passed=len(steps) == len(planned) and all(st.passed for st in steps),
    )
    text = render(result, steps)
    print(text)
    report.write_text(text)
    report.with_suffix(".json").write_text(json.dumps(result, indent=1))
    if plans:
        plans_out.write_text(json.dumps({budget: dict(experts_per_layer=p["experts_per_layer"],
                                                      update_frequency=p["update_frequency"], origin=p["origin"])
                                         for budget, p in plans.items()}, indent=1))
    return result
