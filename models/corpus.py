"""Real text nobody in this project wrote, read offline from this kind of machine, in three domains.

- ``code``: CPython's standard library sources (PSF License 2.0).
- ``prose``: English technical documentation of Perl's core modules, rendered from POD with
  ``pod2text`` (Perl's license: Artistic License or GPL).
- ``manual``: Debian manual pages of sections 1 and 8, rendered with ``man`` (each under its
  Debian package's free license, recorded in ``/usr/share/doc/<package>/copyright``).

A document is one source file. Documents are split into train and held-out by a hash of their
identity, so no held-out document is ever trained on, and the split is the same on every run.
Function/docstring pairs for summarization come from the same documents, with the same split.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import re
import subprocess
import sysconfig
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

DOMAINS = ("code", "prose", "manual")
HELD_OUT_PERCENT = 8
DATA_DIR = Path(__file__).resolve().parent / "data"
CACHE = Path(os.environ.get("SWAPMOE_CACHE", Path.home() / ".cache" / "swapmoe")) / "corpus"
MAX_DOC_CHARS = 60_000  # one very long file should not dominate a domain


@dataclass(frozen=True, slots=True)
class Document:
    domain: str
    source: str  # where it came from, e.g. "cpython:json/decoder.py" or "man:coreutils:ls.1"
    license: str
    text: str


def is_held_out(source: str) -> bool:
    digest = hashlib.sha256(source.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELD_OUT_PERCENT


# --- code ---------------------------------------------------------------------------------------
def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "__pycache__", "ensurepip"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1])
                  and not p.name.startswith("test_"))


def code_documents() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) > 500:
            yield Document("code", f"cpython:{path.relative_to(root)}", "PSF-2.0", text[:MAX_DOC_CHARS])


# --- prose --------------------------------------------------------------------------------------
def prose_documents() -> Iterator[Document]:
    root = Path("/usr/share/perl")
    for path in sorted([*root.rglob("*.pod"), *root.rglob("*.pm")]):
        result = subprocess.run(["pod2text", "-w", "100", str(path)], capture_output=True, text=True,
                                errors="replace")
        text = result.stdout.strip()
        if result.returncode == 0 and len(text) > 1500:
            yield Document("prose", f"perl:{path.relative_to(root)}", "Artistic-1.0-Perl OR GPL-1.0+",
                           text[:MAX_DOC_CHARS])


# --- manual -------------------------------------------------------------------------------------
def _man_page_packages() -> dict[str, str]:
    owners = {}
    for listing in Path("/var/lib/dpkg/info").glob("*.list"):
        package = listing.stem.split(":")[0]
        for line in listing.read_text(errors="replace").splitlines():
            if line.startswith(("/usr/share/man/man1/", "/usr/share/man/man8/")):
                owners[line] = package
    return owners


def manual_documents(limit: int = 2500) -> Iterator[Document]:
    owners = _man_page_packages()
    env = dict(os.environ, MANWIDTH="100", LANG="C.UTF-8")
    for page in sorted(owners)[:limit * 4]:
        path = Path(page)
        if not path.is_file() or path.is_symlink() or _is_stub(path):
            continue
        result = subprocess.run(["man", "--nh", "--nj", "-l", str(path)], capture_output=True, env=env)
        text = subprocess.run(["col", "-bx"], input=result.stdout, capture_output=True).stdout.decode(
            "utf-8", errors="replace").strip()
        if result.returncode == 0 and len(text) > 800:
            yield Document("manual", f"man:{owners[page]}:{path.name.removesuffix('.gz')}",
                           f"Debian package {owners[page]} (see /usr/share/doc/{owners[page]}/copyright)",
                           text[:MAX_DOC_CHARS])
            limit -= 1
            if limit == 0:
                return


def _is_stub(path: Path) -> bool:
    """A '.so other-page' redirect rather than a page of its own."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return f.read(4) == b".so "


# --- the corpus ---------------------------------------------------------------------------------
_BUILDERS = {"code": code_documents, "prose": prose_documents, "manual": manual_documents}


def documents(domain: str) -> list[Document]:
    """All documents of a domain, read once and cached under ~/.cache/swapmoe/corpus."""
    cached = CACHE / f"{domain}.jsonl"
    if not cached.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        docs = list(_BUILDERS[domain]())
        tmp = cached.with_suffix(".tmp")
        with tmp.open("w") as f:
            for doc in docs:
                f.write(json.dumps(asdict(doc)) + "\n")
        tmp.rename(cached)
    return [Document(**json.loads(line)) for line in cached.open()]


def split(domain: str) -> tuple[list[Document], list[Document]]:
    """(train, held-out) documents of a domain."""
    docs = documents(domain)
    return [d for d in docs if not is_held_out(d.source)], [d for d in docs if is_held_out(d.source)]


# --- summarization pairs ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SummaryPair:
    source: str  # document and function, e.g. "cpython:json/decoder.py:py_scanstring"
    name: str  # the function's name (the trivial baseline's input)
    body: str  # the function's code without its docstring
    summary: str  # the first line of its docstring


def function_pairs(doc: Document, max_body_lines: int = 60) -> Iterator[SummaryPair]:
    """Functions with a one-line docstring summary: body (docstring removed) -> that line."""
    try:
        tree = ast.parse(doc.text)
    except SyntaxError:
        return
    lines = doc.text.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        docstring = (ast.get_docstring(node) or "").strip()
        if not docstring or len(node.body) < 2:
            continue
        summary = docstring.splitlines()[0].strip()
        if not 3 <= len(summary.split()) <= 20 or summary.endswith(":"):
            continue
        start = node.body[1].lineno - 1  # first statement after the docstring
        body = textwrap.dedent("\n".join(lines[start:node.end_lineno]))
        header = lines[node.lineno - 1].strip()
        if 1 <= body.count("\n") + 1 <= max_body_lines:
            yield SummaryPair(f"{doc.source}:{node.name}", node.name,
                              f"{header}\n{textwrap.indent(body, '    ')}", summary)


def summary_pairs() -> tuple[list[SummaryPair], list[SummaryPair]]:
    """(train, held-out) function/summary pairs from the code domain, split by document."""
    train, held_out = split("code")
    return ([p for d in train for p in function_pairs(d)], [p for d in held_out for p in function_pairs(d)])


def code_normalizer():
    """``code_as_words`` as a ``tokenizers`` normalizer, installed in the summarizer's tokenizer so
    any loader (our executor, ``AutoTokenizer``) prepares raw code the way the model was trained.
    Idempotent: text already in words comes out unchanged."""
    from tokenizers import Regex, normalizers

    return normalizers.Sequence([
        normalizers.Replace(Regex(r"(?<=[a-z0-9])(?=[A-Z])"), " "),  # getFile -> get File
        normalizers.Replace("_", " "),
        normalizers.Replace(Regex(r"(?=[^\w\s])|(?<=[^\w\s])"), " "),  # punctuation set apart
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Strip(),
    ])


def code_as_words(code: str) -> str:
    """The summarizer's view of code: identifiers split into lower-case words (``getFileName``,
    ``get_file_name`` -> ``get file name``), punctuation set apart, whitespace collapsed. A
    docstring is written in words, so a function's names then tokenize into the very tokens its
    summary uses, and a window of source tokens covers more of the function than indentation allows."""
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", code).replace("_", " ")
    return " ".join(re.sub(r"([^\w\s])", r" \1 ", text).lower().split())


def _extra_python_files() -> list[Path]:
    """Python sources of the packages installed beside this project (torch, transformers, ray, ...),
    of Debian's Python packages, and of the pip/setuptools that ship with CPython. Which files these
    are depends on the installed versions, so the training script prints how many pairs it found."""
    paths = sysconfig.get_paths()
    site = Path(paths["stdlib"]) / "site-packages"
    roots = {Path(paths["purelib"]), Path(paths["platlib"]), Path("/usr/lib/python3/dist-packages"),
             *(site / n for n in ("pip", "setuptools", "pkg_resources"))}
    return sorted(p for root in roots if root.is_dir() for p in root.rglob("*.py")
                  if not {"test", "tests"} & set(p.parts) and not p.name.startswith("test_"))


def extra_summary_pairs(held: list[SummaryPair]) -> list[SummaryPair]:
    """More training pairs for the summarizer, from outside the standard library (training only:
    held-out pairs all come from held-out CPython modules). Pairs whose code or summary equals a
    ``held`` (out) pair's (vendored copies) are dropped, and so are repeated bodies (a package
    vendored twice)."""
    seen = {p.body for p in held} | {p.summary for p in held}
    pairs = []
    for path in _extra_python_files():
        doc = Document("code", f"extra:{path}", "the package's own license (installed packages, Debian main, "
                       "pip and setuptools)", path.read_text(encoding="utf-8", errors="replace")[:MAX_DOC_CHARS])
        for pair in function_pairs(doc):
            if pair.body not in seen and pair.summary not in seen:
                seen.add(pair.body)
                pairs.append(pair)
    return pairs


def name_baseline(name: str) -> str:
    """The trivial summarizer: the function's name as words (``get_user_name`` -> ``get user name``)."""
    return " ".join(part for part in name.strip("_").split("_") if part)


def write_eval_sets(chunk_chars: int = 2000, per_domain: int = 60, pairs: int = 400) -> None:
    """Ship small held-out sets: text chunks per domain, and summarization pairs, with sources."""
    out = DATA_DIR / "eval"
    out.mkdir(parents=True, exist_ok=True)
    for domain in DOMAINS:
        _, held_out = split(domain)
        rows = [dict(source=d.source, license=d.license, text=d.text[:chunk_chars]) for d in held_out]
        with (out / f"{domain}.jsonl").open("w") as f:
            for row in rows[:per_domain]:
                f.write(json.dumps(row) + "\n")
    _, held = summary_pairs()
    with (out / "summarization.jsonl").open("w") as f:
        for pair in held[:pairs]:
            f.write(json.dumps(asdict(pair)) + "\n")


def load_eval(name: str) -> list[dict]:
    """A shipped held-out set: ``code``, ``prose``, ``manual`` or ``summarization``."""
    return [json.loads(line) for line in (DATA_DIR / "eval" / f"{name}.jsonl").open()]


if __name__ == "__main__":
    for domain in DOMAINS:
        train, held = split(domain)
        chars = sum(len(d.text) for d in train)
        print(f"{domain}: {len(train)} train docs ({chars / 1e6:.1f} M chars), {len(held)} held out")
    train_pairs, held_pairs = summary_pairs()
    print(f"summarization: {len(train_pairs)} train pairs, {len(held_pairs)} held out")
    write_eval_sets()
    print(f"wrote {DATA_DIR / 'eval'}")
