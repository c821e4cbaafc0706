"""What ``benchmarks.scale_system`` measures with, apart from its steps: a child command run
under an RSS sampler (accuracy profiling on Ray), a stream with a budget change in the middle,
and one streamed completion through the OpenAI-compatible gateway. No step logic here."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from swapmoe.orchestration.processes import swapmoe_command
from swapmoe.v1 import executor_pb2 as epb

SAMPLE_S = 0.5
WORKER_TITLE = "ray::ScoringWorker"  # the process title Ray gives each accuracy-profiling actor


def scoring_workers(cluster: str | None = None) -> list[psutil.Process]:
    """Ray's accuracy-profiling actors on this machine; with ``cluster`` (a GCS address), only
    those of that cluster (their parent, the raylet, was started with that address)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0].startswith(WORKER_TITLE) and (cluster is None or _in_cluster(process, cluster)):
            found.append(process)
    return found


def _in_cluster(process: psutil.Process, cluster: str) -> bool:
    try:
        parent = process.parent()
        return parent is not None and f"--gcs-address={cluster}" in parent.cmdline()
    except psutil.Error:
        return False


def _rss(processes) -> int:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass  # it exited between listing and reading
    return total


@dataclass
class RssPeak:
    """The peak, over samples every 0.5 s, of the summed RSS of one profiling run's scoring workers,
    and of everything it runs on: the driver ``pid``, its descendants (a local Ray) and the workers
    (descendants of the driver with a local Ray, else the processes of ``cluster``'s raylet)."""

    pid: int
    cluster: str | None = None  # the GCS address of an existing Ray the driver joins
    workers: int = 0  # peak of the scoring workers' summed RSS
    tree: int = 0  # peak of driver + descendants + scoring workers (each process once)
    worker_count: int = 0  # most scoring workers seen at once
    samples: int = 0
    seen: dict[int, psutil.Process] = field(default_factory=dict)  # every process of the run sampled
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> "RssPeak":
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-peak")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(SAMPLE_S)

    def sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            tree = {p.pid: p for p in [root, *root.children(recursive=True)]}
        except psutil.Error:
            return  # the driver has exited
        workers = [w for w in scoring_workers(self.cluster) if self.cluster or w.pid in tree]
        tree.update({p.pid: p for p in workers})
        self.seen.update(tree)
        self.workers = max(self.workers, _rss(workers))
        self.tree = max(self.tree, _rss(tree.values()))
        self.worker_count = max(self.worker_count, len(workers))
        self.samples += 1

    def survivors(self, timeout: float) -> list[str]:
        """The processes of the run still running after up to ``timeout`` s (Ray stops actors and a
        local Ray asynchronously): none, when nothing was left behind."""
        deadline = time.monotonic() + timeout
        while (left := [p for p in self.seen.values() if p.is_running()]) and time.monotonic() < deadline:
            time.sleep(0.2)
        return [_named(p) for p in left if p.is_running()]


def _named(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {process.name()}"
    except psutil.Error:
        return str(process.pid)


def run_logged(args: list[str], log: Path, timeout: float) -> str:
    """``swapmoe *args`` to its end; its output (also written to ``log``), or RuntimeError naming why it failed."""
    done = subprocess.run(swapmoe_command(*args), capture_output=True, text=True, timeout=timeout)
    log.write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"swapmoe {' '.join(args[:2])} exited with {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


@dataclass
class CommandRun:
    seconds: float
    output: str
    peak: RssPeak


def run_sampled(args: list[str], log: Path, timeout: float, cluster: str | None = None) -> CommandRun:
    """``swapmoe *args`` to its end while sampling its memory; its output goes to ``log``. On
    failure, timeout or Ctrl-C the command and everything it started are stopped (``stop_tree``)."""
    started = time.monotonic()
    with open(log, "w") as out:
        process = subprocess.Popen(swapmoe_command(*args), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # Ctrl-C reaches it through ``stop_tree`` only
        peak = RssPeak(process.pid, cluster).start()
        try:
            code = process.wait(timeout)
        except BaseException:
            stop_tree(process)
            raise
        finally:
            peak.stop()
    output = log.read_text()
    if code:
        raise RuntimeError(f"swapmoe {' '.join(args[:2])} exited with {code}:\n{output[-3000:]}")
    return CommandRun(time.monotonic() - started, output, peak)


def stop_tree(process: subprocess.Popen, grace: float = 30.0) -> None:
    """Stop ``process`` and its descendants: SIGTERM (a Ray driver then stops the local Ray it
    started), then SIGKILL to whatever is left."""
    try:
        family = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        family = []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for child in family:
        try:
            child.kill()
        except psutil.Error:
            pass


@dataclass
class StreamWithChange:
    """A streamed Generate with a call made after its first few tokens."""

    tokens: int = 0  # token ids received in chunks
    usage_tokens: int = 0  # completion tokens the last chunk reports
    finish_reason: str = ""
    seconds: float = 0.0
    change_after: int = 0  # tokens received when the call was made (0: never made)
    change_started: float = 0.0  # time.monotonic() when the call was made
    change_seconds: float = 0.0
    change_result: object = None

    @property
    def complete(self) -> bool:
        """Every token the executor counted reached the client, and the stream ended properly."""
        return bool(self.finish_reason) and self.tokens == self.usage_tokens > 0


def stream_with_change(stub, text: str, max_new_tokens: int, after: int, change, timeout: float) -> StreamWithChange:
    """Stream ``text`` (greedy) and call ``change()`` once ``after`` tokens have arrived, timing it."""
    result = StreamWithChange()
    started = time.perf_counter()
    request = epb.GenerateRequest(text=text, max_new_tokens=max_new_tokens, sampling=epb.SamplingParams(temperature=0))
    for chunk in stub.Generate(request, timeout=timeout):
        result.tokens += len(chunk.token_ids)
        if not result.change_after and result.tokens >= after:
            result.change_after, result.change_started, t0 = result.tokens, time.monotonic(), time.perf_counter()
            result.change_result = change()
            result.change_seconds = time.perf_counter() - t0
        if chunk.finish_reason:
            result.finish_reason = epb.FinishReason.Name(chunk.finish_reason)
            result.usage_tokens = chunk.usage.completion_tokens
    result.seconds = time.perf_counter() - started
    return result


def gateway_completion(address: str, prompt: str, max_tokens: int, timeout: float) -> dict:
    """One streamed /v1/completions request through the gateway (plain HTTP, server-sent events):
    its time to the first chunk with a choice, its text and whether the stream ended with [DONE]."""
    base = f"http://{address}/v1"
    with urllib.request.urlopen(f"{base}/models", timeout=timeout) as response:
        model = json.load(response)["data"][0]["id"]
    body = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
    request = urllib.request.Request(f"{base}/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    started, first, chunks, text, done = time.perf_counter(), None, 0, "", False
    with urllib.request.urlopen(request, timeout=timeout) as response:
        status = response.status
        for line in response:
            if not line.startswith(b"data: "):
                continue
            payload = line[len(b"data: "):].strip()
            if payload == b"[DONE]":
                done = True
                break
            choices = json.loads(payload).get("choices") or []
            if choices:
                first = first if first is not None else time.perf_counter() - started
                chunks += 1
                text += choices[0].get("text", "")
    return dict(model=model, status=status, ttft_s=first, seconds=time.perf_counter() - started, chunks=chunks,
                text=text, done=done)
