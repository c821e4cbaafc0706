"""llama.cpp as a peer: a Hugging Face Mixtral checkpoint converted to GGUF, decoded in its own process.

    pip install -e '.[executor,peer]'                      # llama-cpp-python builds llama.cpp from source
    python -m benchmarks.peer_llamacpp --fetch-converter   # convert_hf_to_gguf.py, from the same sdist
    python -m benchmarks.peer_llamacpp models/swapmoe-lm --outtype f32,f16 --threads 2
    python -m benchmarks.peer_llamacpp models/swapmoe-lm --outtype f16 --cap-mib 64 --sample

``convert`` runs llama.cpp's ``convert_hf_to_gguf.py`` (``--fetch-converter`` takes it from the sdist
of the installed llama-cpp-python; or set ``$SWAPMOE_LLAMA_CPP_SOURCE`` to a llama.cpp checkout).
``LlamaProcess`` serves a GGUF from a child process whose memory is its own and may be capped (cgroup
v1); ``decode`` is one generation in a fresh one. Tokens/s = (tokens - 1) / (last token - first).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import cgroup_cap

REPO = Path(__file__).resolve().parent.parent
SOURCE_ENV = "SWAPMOE_LLAMA_CPP_SOURCE"
DISTRIBUTION = "llama-cpp-python"
CONVERTED = ("f32", "f16", "q8_0")  # written by convert_hf_to_gguf.py itself
QUANTIZED = {"q4_0": 2, "q4_k_m": 15}  # llama_ftype values: quantized by llama.cpp from an f32 GGUF
OUTTYPES = CONVERTED + tuple(QUANTIZED)
NEEDED = ("llama_cpp", "gguf", "torch", "transformers", "safetensors")  # llama.cpp, and what the converter imports


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "swapmoe"


def installed_version() -> str | None:
    return next((d.version for d in importlib.metadata.distributions(name=DISTRIBUTION)), None)


def converter_dir() -> Path | None:
    """Where ``convert_hf_to_gguf.py`` (with its ``conversion/`` and ``gguf-py/``) is looked for:
    ``$SWAPMOE_LLAMA_CPP_SOURCE``, else the cache ``--fetch-converter`` fills for the installed version."""
    if os.environ.get(SOURCE_ENV):
        return Path(os.environ[SOURCE_ENV]).expanduser().resolve()
    version = installed_version()
    return cache_root() / f"llama.cpp-{version}" if version else None


def fetch_converter(sdist: Path | None = None) -> Path:
    """Extracts the converter from the llama-cpp-python sdist (``sdist``, else ``pip download`` fetches
    the installed version's) into ``converter_dir()``, which it returns."""
    if (version := installed_version()) is None:
        raise RuntimeError(f"{DISTRIBUTION} is not installed: pip install -e '.[executor,peer]' first")
    target = converter_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        if sdist is None:
            subprocess.run([sys.executable, "-m", "pip", "download", f"{DISTRIBUTION}=={version}", "--no-binary",
                            ":all:", "--no-deps", "-d", work], check=True)
            sdist = next(Path(work).glob("*.tar.gz"))
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(
                tuple(prefix + part for part in ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")))]
            if prefix + "convert_hf_to_gguf.py" not in {m.name for m in members}:
                raise RuntimeError(f"{sdist} holds no {prefix}convert_hf_to_gguf.py (another version?)")
            tar.extractall(work, members, filter="data")
        if not target.exists():
            os.replace(Path(work, prefix), target)
    return target


def available() -> str:
    """'' when checkpoints can be converted and run, else one line: what is missing, what to run."""
    if missing := [name for name in NEEDED if importlib.util.find_spec(name) is None]:
        return (f"llama.cpp peer skipped: {', '.join(missing)} not installed (pip install -e '.[executor,peer]'; "
                "building llama-cpp-python takes ~17 minutes on 2 cores)")
    source = converter_dir()
    if source is None or not (source / "convert_hf_to_gguf.py").is_file():
        return (f"llama.cpp peer skipped: no convert_hf_to_gguf.py in {source} (run `python -m benchmarks."
                f"peer_llamacpp --fetch-converter` in {REPO}, or set {SOURCE_ENV} to a llama.cpp checkout)")
    return ""


# convert_hf_to_gguf.py, changed from outside in two ways. A BPE pre-tokenizer it does not know (ours, a
# byte-level GPT-2 regex trained here, hashes to no entry of its table) is taken to be "gpt-2". A BPE
# vocabulary without merges (the random test models' byte tokenizer), which llama.cpp refuses to load,
# gets one that never applies: no merge forms either of its two multi-character symbols.
_CONVERT = """
import sys; sys.path.insert(0, sys.argv[1])
import convert_hf_to_gguf, gguf
from conversion.base import TextModel
def get_vocab_base_pre(self, tokenizer, known=TextModel.get_vocab_base_pre):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
def add_to_gguf(self, writer, quiet=False, add=gguf.SpecialVocab.add_to_gguf):
    self.merges = self.merges or (["<s> </s>"] if self.load_merges else [])
    add(self, writer, quiet)
TextModel.get_vocab_base_pre, gguf.SpecialVocab.add_to_gguf = get_vocab_base_pre, add_to_gguf
sys.argv = ["convert_hf_to_gguf.py", sys.argv[2], "--outfile", sys.argv[3], "--outtype", sys.argv[4]]
convert_hf_to_gguf.main()
"""

_QUANTIZE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread = int(sys.argv[3]), int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def convert(checkpoint_dir: Path, out_path: Path, outtype: str, *, threads: int = 2) -> Path:
    """``out_path``: the checkpoint as a GGUF of ``outtype`` (one of OUTTYPES), kept while it is newer
    than every file of the checkpoint. 4-bit types go through an f32 GGUF and llama.cpp's quantizer
    (k-quants fall back to other types for rows not a multiple of 256, as llama.cpp reports)."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r}: use one of {', '.join(OUTTYPES)}")
    checkpoint_dir, out_path = Path(checkpoint_dir).resolve(), Path(out_path).resolve()
    if out_path.exists() and out_path.stat().st_mtime > max(p.stat().st_mtime for p in checkpoint_dir.iterdir()):
        return out_path
    if note := available():
        raise RuntimeError(note)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial, f32 = (out_path.with_name(f".{out_path.name}.{part}") for part in ("partial", "f32.partial"))
    try:
        if outtype in CONVERTED:
            _run("convert", _CONVERT, converter_dir(), checkpoint_dir, partial, outtype)
        else:
            _run("convert", _CONVERT, converter_dir(), checkpoint_dir, f32, "f32")
            _run("quantize", _QUANTIZE, f32, partial, QUANTIZED[outtype], threads)
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
        f32.unlink(missing_ok=True)
    return out_path


def gguf_for(checkpoint_dir: Path, outtype: str, directory: Path | None = None, *, threads: int = 2) -> Path:
    """``convert`` into ``directory`` (default ~/.cache/swapmoe/gguf), one file per checkpoint path and type."""
    checkpoint_dir = Path(checkpoint_dir).resolve()
    tag = hashlib.sha1(str(checkpoint_dir).encode()).hexdigest()[:8]
    directory = Path(directory) if directory else cache_root() / "gguf"
    return convert(checkpoint_dir, directory / f"{checkpoint_dir.name}-{tag}-{outtype}.gguf", outtype, threads=threads)


@dataclass(frozen=True, slots=True)
class Generation:
    token_ids: list[int]
    times_ns: list[int]  # [0 = the prefill's start, then each token's arrival]

    @property
    def decode_tokens_per_second(self) -> float:
        spent = self.times_ns[-1] - self.times_ns[1]
        return (len(self.token_ids) - 1) / (spent / 1e9) if spent > 0 else 0.0


class LlamaProcess:
    """One GGUF, served by llama.cpp from a child process that holds nothing else.

    With ``cap_bytes`` the child runs in a new memory cgroup limited to that many bytes, the GGUF
    first evicted from the page cache so that the cgroup is charged for reading it; where no cgroup
    can be made the child runs uncapped, ``capped`` is False and ``cap_note`` says why."""

    def __init__(self, gguf: Path, threads: int, *, cap_bytes: int | None = None, n_ctx: int = 512):
        self.gguf, self.cap_bytes, self.cgroup, self.cap_note = Path(gguf).resolve(), cap_bytes, None, ""
        if cap_bytes is not None:
            cgroup_cap.evict(self.gguf)
            try:
                self.cgroup = cgroup_cap.make(cap_bytes)
            except OSError as error:
                self.cap_note = f"not capped: no memory cgroup ({error})"
        self.capped, self.loaded = self.cgroup is not None, False
        self.errors = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe would stall the child
        spec = dict(gguf=str(self.gguf), threads=threads, n_ctx=n_ctx, cgroup=str(self.cgroup or ""))
        try:
            self.child = subprocess.Popen([sys.executable, "-c", "from benchmarks.peer_llamacpp import serve; serve()",
                                           json.dumps(spec)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=self.errors, text=True)
        except BaseException:
            self._release()
            raise

    def generate(self, prompt_ids: list[int], new_tokens: int, *, sample: bool = False, seed: int = 0) -> Generation:
        """``new_tokens`` tokens (an end of text does not stop it), greedy or sampled at temperature 1."""
        if new_tokens < 1:
            raise ValueError(f"new_tokens is {new_tokens}: generate at least one")
        reply = self._ask(dict(prompt=list(prompt_ids), new_tokens=new_tokens, sample=sample, seed=seed))
        return Generation(reply["token_ids"], reply["times_ns"])

    def memory(self) -> dict:
        """The child's peak and current RSS in bytes (``rss_file``: mapped, mostly the GGUF), its RSS once
        llama_cpp was imported (``library_rss``), and when capped the cgroup's peak and failed charges."""
        out = self._ask(dict(memory=True))
        if self.cgroup:
            out |= {key: int((self.cgroup / f"memory.{name}").read_text())
                    for key, name in (("cgroup_peak", "max_usage_in_bytes"), ("cgroup_failcnt", "failcnt"))}
        return out

    def close(self) -> int | None:
        """Ends the child (end of input, then a kill), removes the cgroup; returns the exit status."""
        try:
            if self.child.poll() is None:
                self.child.stdin.close()
                self.child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()
        finally:
            self._release()
        return self.child.returncode

    def _release(self) -> None:
        self.errors.close()
        if self.cgroup:
            cgroup_cap.remove(self.cgroup)

    def _ask(self, request: dict) -> dict:
        if not self.loaded:  # the child's first reply says that the model is loaded
            self._reply()
            self.loaded = True
        with contextlib.suppress(BrokenPipeError):  # the child has ended: _reply says how
            self.child.stdin.write(json.dumps(request) + "\n")
            self.child.stdin.flush()
        return self._reply()

    def _reply(self) -> dict:
        if line := self.child.stdout.readline():
            return json.loads(line)
        status = self.child.wait()
        self.errors.seek(0)
        killed = " (killed: out of memory under the cap?)" if status == -9 and self.capped else ""
        raise ChildProcessError(f"llama.cpp process ended with status {status}{killed}: {self.errors.read()[-2000:]}")


def decode(gguf_path: Path, prompt_ids: list[int], new_tokens: int, threads: int, *, sample: bool = False,
           seed: int = 0, cap_bytes: int | None = None, warmup: int = 0) -> dict:
    """One generation in a fresh llama.cpp process (after ``warmup`` tokens of another, as llama-bench
    warms up, when given): tokens, decode tokens/s, TTFT, token ids, its memory, ``capped`` and
    ``cap_note``; one that dies under a cap (out of memory) gives ``error``, not an exception."""
    result = dict(gguf=str(gguf_path), threads=threads, sample=sample, cap_bytes=cap_bytes, warmup=warmup)
    process = LlamaProcess(gguf_path, threads, cap_bytes=cap_bytes)
    try:
        if warmup:
            process.generate(prompt_ids, warmup, sample=sample, seed=seed + 1)
        made = process.generate(prompt_ids, new_tokens, sample=sample, seed=seed)
        result |= dict(tokens=len(made.token_ids), decode_tokens_per_second=made.decode_tokens_per_second,
                       ttft_ms=made.times_ns[1] / 1e6, token_ids=made.token_ids, **process.memory())
    except ChildProcessError as error:
        if not process.capped:
            raise
        result |= dict(tokens=0, decode_tokens_per_second=0.0, error=str(error))
    finally:
        result |= dict(capped=process.capped, cap_note=process.cap_note)
        process.close()
    return result


def serve() -> None:
    """The child: one JSON request per line of stdin, one JSON reply per line on the stdout it was
    given (anything llama.cpp prints goes to stderr), until the end of stdin."""
    spec = json.loads(sys.argv[1])
    cgroup_cap.join(spec["cgroup"])  # before the model is read, so that the cgroup is charged for all of it
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import llama_cpp

    library_rss = _status()["VmRSS"]
    llm = llama_cpp.Llama(spec["gguf"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
                          n_ctx=spec["n_ctx"], verbose=False)
    for request in itertools.chain([{}], map(json.loads, sys.stdin)):
        if "prompt" in request:
            reply = _generate(llm, request)
        else:  # the first reply ("ready", the model loaded) and {"memory": true}
            status = _status()
            reply = dict(library_rss=library_rss, peak_rss=status["VmHWM"], rss=status["VmRSS"],
                         rss_file=status["RssFile"], rss_anon=status["RssAnon"])
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def _generate(llm, request: dict) -> dict:
    sampling = dict(temp=1.0, top_k=0, top_p=1.0, min_p=0.0) if request["sample"] else dict(temp=0.0, top_k=1)
    llm.set_seed(request["seed"])
    llm.reset()
    ids, times = [], [time.perf_counter_ns()]
    for token in llm.generate(request["prompt"], reset=True, repeat_penalty=1.0, **sampling):
        times.append(time.perf_counter_ns())
        ids.append(int(token))
        if len(ids) == request["new_tokens"]:
            break
    return dict(token_ids=ids, times_ns=[t - times[0] for t in times])


def _status() -> dict[str, int]:  # /proc/self/status's sizes, in bytes
    with open("/proc/self/status") as status:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in status) if v.endswith("kB\n")}


def _run(step: str, program: str, *args) -> None:
    """``program`` in a fresh Python (the converter brings its own ``gguf``), from a neutral directory."""
    done = subprocess.run([sys.executable, "-c", program, *map(str, args)], capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    if done.returncode:
        raise RuntimeError(f"{step} {' '.join(map(str, args))} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, nargs="?", help="a Hugging Face Mixtral directory")
    parser.add_argument("--outtype", default="f16", help=f"comma-separated, of {', '.join(OUTTYPES)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per type, the types alternating")
    parser.add_argument("--cap-mib", type=float, help="run each under a memory cgroup of this many MiB")
    parser.add_argument("--sample", action="store_true", help="temperature 1, seed = run (random models loop greedily)")
    parser.add_argument("--fetch-converter", action="store_true", help="extract convert_hf_to_gguf.py, then exit")
    parser.add_argument("--sdist", type=Path, help="with --fetch-converter: this llama-cpp-python sdist, no download")
    args = parser.parse_args(argv)
    if args.fetch_converter:
        print(f"converter in {fetch_converter(args.sdist)}")
        return
    if args.checkpoint is None or (note := available()):
        parser.exit(1, (note if args.checkpoint else "give a checkpoint directory") + "\n")
    outtypes = args.outtype.split(",")
    ggufs = {t: gguf_for(args.checkpoint, t, threads=args.threads) for t in outtypes}
    prompt = [5 + (j * 7) % 250 for j in range(32)]
    cap = int(args.cap_mib * 2**20) if args.cap_mib else None
    runs = {t: [] for t in outtypes}
    for run in range(args.runs):
        for t in outtypes:  # alternating: a neighbour taking a core hits every type alike
            runs[t].append(decode(ggufs[t], prompt, args.new_tokens, args.threads, sample=args.sample, seed=run,
                                  cap_bytes=cap))
    print(f"{args.threads} threads, {args.new_tokens} new tokens, {'sampled' if args.sample else 'greedy'}")
    print(table(args.checkpoint.name, ggufs, runs))


def table(model: str, ggufs: dict[str, Path], runs: dict[str, list[dict]]) -> str:
    """One row per type: the median decode rate of the runs that finished, the memory of the last."""
    lines = ["| model | type | GGUF MiB | tokens/s (median) | runs | peak RSS MiB | file-backed RSS MiB | "
             "cgroup peak MiB | capped |", "|" + "---|" * 9]
    for outtype, results in runs.items():
        done = [r for r in results if not r.get("error")]
        last = (done or results)[-1]
        median = statistics.median(r["decode_tokens_per_second"] for r in done) if done else 0.0
        capped = f"yes, {last['cap_bytes'] / 2**20:.0f} MiB" if last["capped"] else last["cap_note"] or "no"
        capped += f"; {len(results) - len(done)} died" if len(done) < len(results) else ""
        rates = " ".join(f"{r['decode_tokens_per_second']:.1f}" for r in results)
        mib = [f"{last[k] / 2**20:.0f}" if k in last else "-" for k in ("peak_rss", "rss_file", "cgroup_peak")]
        lines.append(f"| {model} | {outtype} | {ggufs[outtype].stat().st_size / 2**20:.1f} | {median:.1f} | {rates} | "
                     f"{' | '.join(mib)} | {capped} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
