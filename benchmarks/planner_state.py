"""The planner's state store at fleet scale: N executors saved, the planner stopped, restarted.

    python -m benchmarks.planner_state     # writes benchmarks/results/RESULTS-planner-state.md

For N = 1,000 and 10,000 synthetic executors (the bundled LM's layout, a registration with
labels and a device, a searched-looking plan desired and acknowledged, a reason): save every
record through ``PlannerState`` written behind every 0.2 s as the server runs it, close (the
last pass), then time a restart (``PlannerState(dir).load()``), and measure the state's bytes
on disk. "save, caller" is the time the callers spent in ``save`` (the registry holds its lock
meanwhile); "save all" runs from the first ``save`` to the end of ``close``. The JSON store the
database replaced (one file per executor) is measured beside it when git can show it: the
newest committed ``planner_service/state.py`` without SQLite, or the revision ``--json-from``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from swapmoe.core.budget import MemoryModel
from swapmoe.core.plan import Plan
from swapmoe.planner_service.records import ExecutorRecord, digest
from swapmoe.planner_service.registration import check_registration
from swapmoe.planner_service.state import PlannerState
from swapmoe.rpc import convert
from swapmoe.simulation.node import LM_RESERVE, half_budget, lm_layout
from swapmoe.v1 import common_pb2, planner_pb2 as ppb

HERE = Path(__file__).resolve().parent
REPORT = HERE / "results" / "RESULTS-planner-state.md"
SIZES = (1_000, 10_000)
WRITE_BEHIND_S = 0.2  # as planner_service.server runs it


def records(n: int) -> list[ExecutorRecord]:
    """``n`` executors as a planner that planned them all holds them."""
    layout = lm_layout()
    memory = MemoryModel(layout, LM_RESERVE, 8 << 30)
    budget = half_budget(memory)
    template = ppb.Registration(
        node_id="sim-00000", budget_bytes=budget, min_budget_bytes=memory.min_budget_bytes, layout=convert.layout_to_pb(layout),
        reserve=convert.reserve_to_pb(LM_RESERVE), model_fingerprint="f1ee700000000000",
        device=common_pb2.DeviceInfo(kind="cpu", name="bench", memory_bytes=8 << 30, cpu_count=4, hostname="host"))
    memory = check_registration(template).memory
    out = []
    for i in range(n):
        reg = ppb.Registration()
        reg.CopyFrom(template)
        reg.node_id, reg.executor_address = f"sim-{i:05d}", f"10.0.{i // 250}.{i % 250}:50051"
        reg.labels.update({"class": "ab"[i % 2], "region": ("eu", "us")[i // 2 % 2]})
        plan = Plan(3, (8, 8, 8, 8, 7, 7), update_frequency=16, origin="planner:search")
        out.append(ExecutorRecord(reg.node_id, reg, memory, desired=plan, acked=plan, state=ppb.PLAN_STATE_ACKED,
                                  version=3, secret_digest=digest(f"secret-{i}"), claimed=True,
                                  last_seen_ns=time.time_ns(), workload="prose", reason="searched for prose"))
    return out


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True, check=True).stdout


def json_store(revision: str | None):
    """The JSON store's ``PlannerState`` (and its revision) as of ``revision`` (None: the newest
    commit whose state.py has no SQLite), or None when git cannot show it."""
    try:
        revisions = [revision] if revision else git("log", "-n", "20", "--format=%h", "--",
                                                     "planner_service/state.py").split()
        sources = ((r, git("show", f"{r}:planner_service/state.py")) for r in revisions)
        revision, source = next((r, s) for r, s in sources if "sqlite3" not in s)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return None
    spec = importlib.util.spec_from_loader("swapmoe.planner_service.json_state", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{revision}:planner_service/state.py", "exec"), module.__dict__)  # noqa: S102
    return revision, module.PlannerState


def disk_bytes(directory: Path) -> tuple[int, int, int]:
    """Files under ``directory``, their bytes, and the bytes the file system allocated for them."""
    files = [p.stat() for p in directory.rglob("*") if p.is_file()]
    return len(files), sum(f.st_size for f in files), sum(f.st_blocks * 512 for f in files)


def measure(store, n: int) -> dict:
    batch = records(n)
    for record in batch:
        record.registration_json = None  # the JSON store cached its registration JSON on the record
    with tempfile.TemporaryDirectory(prefix="planner-state-") as directory:
        directory = Path(directory)
        state = store(directory, write_behind_s=WRITE_BEHIND_S)
        start = time.perf_counter()
        for record in batch:
            state.save(record)
        caller = time.perf_counter() - start
        state.close()
        saved = time.perf_counter() - start
        files, size, allocated = disk_bytes(directory)
        start = time.perf_counter()
        loaded = store(directory).load()
        restart = time.perf_counter() - start
        assert len(loaded) == n, f"{len(loaded)} of {n} records read back"
        return {"n": n, "bytes": size, "allocated": allocated, "files": files,
                "caller_s": caller, "save_s": saved, "restart_s": restart}


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| store | executors | files | bytes (allocated) | save, caller (per record) | save all | restart |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['n']:,} | {r['files']:,} | {r['bytes'] / 2**20:.1f} MiB "
                     f"({r['allocated'] / 2**20:.1f} MiB) "
                     f"| {r['caller_s'] * 1e3:.0f} ms ({r['caller_s'] / r['n'] * 1e6:.1f} µs) "
                     f"| {r['save_s']:.2f} s | {r['restart_s']:.2f} s |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json-from", help="git revision whose state.py is the JSON store (default: the newest)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    stores = [("SQLite (planner.db)", PlannerState)]
    old = json_store(args.json_from)
    if old is not None:
        stores.append((f"JSON files ({old[0]})", old[1]))
    rows = [(name, measure(store, n)) for n in args.sizes for name, store in stores]
    text = table(rows)
    print(text)
    if args.no_write:
        return
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, " \
              f"SQLite {sqlite3.sqlite_version}"
    method = " ".join(__doc__.split("\n\n")[2].split())  # the docstring's account of the method
    REPORT.write_text(
        "# Planner state: one SQLite database against one JSON file per executor\n\n"
        f"`python -m benchmarks.planner_state` on {machine}; a temporary directory on the local disk. "
        f"{method}\n\n"
        "\"save, caller\": time in `save` on the callers' threads (the registry's lock is held meanwhile; the "
        "SQLite store only notes a copy there, the JSON store too, written behind every 0.2 s). \"save all\": "
        "from the first `save` to the end of `close`. \"restart\": `PlannerState(dir).load()`, every record "
        "decoded and validated. \"files\", \"bytes\": the files under the state directory after `close`, "
        "their sizes and the blocks the file system gave them.\n\n"
        f"{text}\n")
    print(f"wrote {REPORT}", file=sys.stderr)


if __name__ == "__main__":
    main()
