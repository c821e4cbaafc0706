"""Executor labels and the selectors that pick executors by them.

Labels are what fleet tools select on: device class, model, region. A selector is
comma-separated ``key=value`` and ``key!=value`` terms that must all hold (Kubernetes'
equality-based selectors); the empty selector matches everything. Paging over executors
goes by node id (``page_after``), so a page token is the last node id of a page.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from swapmoe.core.errors import InvalidField
from swapmoe.core.limits import MAX_NODE_ID_CHARS, check_count, check_range

MAX_LABELS = 32
MAX_LABEL_VALUE_CHARS = 256
MAX_SELECTOR_CHARS = 4096
DEFAULT_PAGE = 500
MAX_PAGE = 5000
# A key as Kubernetes allows one: an optional DNS prefix and a name of letters, digits, -_.
_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def check_labels(field: str, labels: Mapping[str, str]) -> None:
    check_count(field, labels, MAX_LABELS)
    for key, value in labels.items():
        if not _KEY.match(key):
            raise InvalidField(f"{field}[{key!r}]", "a label key is letters, digits, '-', '_' and '.', at most 63 "
                                                    "characters, starting and ending with a letter or digit "
                                                    "(optionally after a 'domain/' prefix)")
        if len(value) > MAX_LABEL_VALUE_CHARS or not value.isprintable():
            raise InvalidField(f"{field}[{key!r}]", f"a label value is at most {MAX_LABEL_VALUE_CHARS} printable "
                                                    f"characters")


def parse_labels(field: str, terms: Iterable[str]) -> dict[str, str]:
    """``["class=phone", "region=eu"]`` (a CLI's repeated ``--label``) as a checked dict."""
    labels = {}
    for term in terms:
        key, sep, value = term.partition("=")
        if not sep:
            raise InvalidField(field, f"{term!r} is not key=value")
        labels[key.strip()] = value.strip()
    check_labels(field, labels)
    return labels


@dataclass(frozen=True)
class Selector:
    """Equality terms: every ``equal`` pair must hold and no ``unequal`` pair may."""

    equal: tuple[tuple[str, str], ...] = ()
    unequal: tuple[tuple[str, str], ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return (all(labels.get(k) == v for k, v in self.equal)
                and all(labels.get(k) != v for k, v in self.unequal))

    def __str__(self) -> str:
        return ",".join([f"{k}={v}" for k, v in self.equal] + [f"{k}!={v}" for k, v in self.unequal])


def parse_selector(text: str, field: str = "selector") -> Selector:
    """``"class=phone,region!=us"``; raises InvalidField naming the bad term."""
    if len(text) > MAX_SELECTOR_CHARS:
        raise InvalidField(field, f"has {len(text)} characters; at most {MAX_SELECTOR_CHARS} are allowed")
    equal, unequal = [], []
    for term in filter(None, (t.strip() for t in text.split(","))):
        negated = "!=" in term
        key, _, value = term.partition("!=" if negated else "=")
        key, value = key.strip(), value.strip()
        if "=" not in term or not _KEY.match(key) or "=" in value or not value.isprintable():
            raise InvalidField(field, f"{term!r} is not key=value or key!=value (a key is letters, digits, '-', "
                                      f"'_' and '.')")
        (unequal if negated else equal).append((key, value))
    return Selector(tuple(equal), tuple(unequal))


def check_page_size(field: str, size: int, default: int = DEFAULT_PAGE) -> int:
    """The page size a request asks for, 0 meaning ``default``."""
    check_range(field, size, 0, MAX_PAGE)
    return size or default


def page_token(last: str) -> str:
    """The opaque token of the page after the one that ended at node id ``last``."""
    return base64.urlsafe_b64encode(last.encode()).decode()


def page_after(field: str, token: str) -> str:
    """The node id a page token continues after ("" for the first page)."""
    if not token:
        return ""
    try:
        last = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidField(field, "is not a token this server gave out") from None
    if len(last) > MAX_NODE_ID_CHARS * 4:
        raise InvalidField(field, "is not a token this server gave out")
    return last
