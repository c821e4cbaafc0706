"""Server flags' defaults from the environment, as TGI and llama.cpp users set them in containers.

Every flag of ``swapmoe ROLE serve`` takes its default from ``SWAPMOE_<ROLE>_<FLAG>``: ``--budget``
of the executor is ``SWAPMOE_EXECUTOR_BUDGET``, ``--state-dir`` of the planner
``SWAPMOE_PLANNER_STATE_DIR``. The role is in the name because the executor, the planner and the
control node share flags (``--port``, ``--state-dir``, ``--planner``) and often one shell or host.
A flag on the command line wins; a required flag is satisfied by its variable; a switch
(``--insecure``) reads 1/true/yes/on or 0/false/no/off; a repeatable flag (``--label``,
``--planner``) reads a comma-separated list. A value is converted and checked like the flag's
own, only when the command runs, and a bad one is an ``EnvError`` naming the variable.
"""

from __future__ import annotations

import argparse
from typing import Mapping

PREFIX = "SWAPMOE_"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class EnvError(Exception):
    """A variable holds a value its flag does not accept. Not a ValueError, which argparse would
    turn into a message about the flag, not the variable."""


class _FromEnv(str):
    """A default read from the environment. argparse converts a string default with the flag's
    ``type`` when the flag is absent; the converter knows it by this class and names ``variable``."""

    variable: str

    def __new__(cls, variable: str, value: str):
        text = super().__new__(cls, value)
        text.variable = variable
        return text


class _AppendOverEnv(argparse._AppendAction):
    """``--label`` and the like: the first value on the command line replaces the environment's list."""

    def __call__(self, parser, namespace, values, option_string=None):
        if isinstance(getattr(namespace, self.dest, None), _FromEnv):
            setattr(namespace, self.dest, [])
        super().__call__(parser, namespace, values, option_string)


def variable(role: str, action: argparse.Action) -> str:
    return f"{PREFIX}{role.upper()}_{action.dest.upper()}"


def apply(parser: argparse.ArgumentParser, role: str, environ: Mapping[str, str]) -> None:
    """Give each of ``parser``'s flags its variable: in its help, and as its default when set."""
    for action in parser._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        name = variable(role, action)
        if action.help != argparse.SUPPRESS:
            action.help = f"{action.help or ''} [env {name}]"
        if name not in environ:
            continue
        action.type = _converter(action)
        action.default = _FromEnv(name, environ[name])
        action.required = False
        if type(action) is argparse._AppendAction:
            action.__class__ = _AppendOverEnv


def _converter(action: argparse.Action):
    """The flag's own conversion for command-line text; for the environment's, the same conversion
    (per item of a list, or as a switch) with errors naming the variable."""
    own = action.type or str
    if isinstance(action, argparse._StoreConstAction):
        set_, unset = action.const, action.default
        convert = lambda text: set_ if _switch(text) else unset  # noqa: E731
    elif isinstance(action, argparse._AppendAction):
        convert = lambda text: [own(item.strip()) for item in text.split(",") if item.strip()]  # noqa: E731
    else:
        convert = own

    def typed(text: str):
        if not isinstance(text, _FromEnv):
            return own(text)
        try:
            value = convert(str(text))
        except (argparse.ArgumentTypeError, TypeError, ValueError) as error:
            raise EnvError(f"{text.variable}={str(text)!r}: {error}") from None
        for item in value if isinstance(value, list) else [value]:
            if action.choices is not None and item not in action.choices:
                raise EnvError(f"{text.variable}={str(text)!r}: expected one of {', '.join(map(str, action.choices))}")
        return value

    typed.__name__ = getattr(own, "__name__", "value")  # argparse names the type in its own messages
    return typed


def _switch(text: str) -> bool:
    if text.strip().lower() in TRUE:
        return True
    if text.strip().lower() in FALSE:
        return False
    raise ValueError(f"expected one of {', '.join(TRUE + FALSE)}")


def apply_to_servers(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """``apply`` to every ``swapmoe ROLE serve`` under ``parser``, with ROLE from the command path."""
    for sub in _leaves(parser):
        words = sub.prog.split()
        if len(words) >= 3 and words[-1] == "serve":
            apply(sub, words[-2], environ)


def _leaves(parser: argparse.ArgumentParser):
    children = [c for a in parser._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices.values()]
    if not children:
        yield parser
    for child in children:
        yield from _leaves(child)
