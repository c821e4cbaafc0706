"""The deployment files in deploy/ say what the code accepts: the systemd units parse (and pass
``systemd-analyze verify`` where it exists), their command lines and environment files parse with
the real ``swapmoe`` parser, and the container file's stages install existing extras, run as a user,
expose the ports they serve and probe health in a way that works against a real server."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from swapmoe.core.sizes import parse_size
from swapmoe.cli import env_defaults
from swapmoe.cli.main import build_parser
from swapmoe.rpc import transport

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
ROLES = ["executor", "planner"]
# Variables read outside the serve flags: the store's root, the profiles' root, the dial-out token.
OTHER_VARIABLES = {"SWAPMOE_STORE_ROOT", "SWAPMOE_PROFILES", "SWAPMOE_TOKEN"}
SPECIFIERS = {"%S": "/var/lib", "%C": "/var/cache"}  # systemd's, for a system unit


# --- systemd ---------------------------------------------------------------------------------

def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values]}}: comments, sections and Key=Value lines only
    (systemd allows a key more than once, e.g. Environment=); anything else fails."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if match := re.fullmatch(r"\[([A-Za-z]+)\]", line):
            assert match[1] not in sections, f"{path.name}:{number}: section [{match[1]}] twice"
            current = sections[match[1]] = {}
            continue
        match = re.fullmatch(r"([A-Za-z][A-Za-z0-9]*)=(.*)", line)
        assert match and current is not None, f"{path.name}:{number}: not a key in a section: {line!r}"
        current.setdefault(match[1], []).append(match[2])
    return sections


def unit(role: str) -> dict[str, dict[str, list[str]]]:
    return parse_unit(DEPLOY / f"swapmoe-{role}.service")


def unit_environment(service: dict[str, list[str]]) -> dict[str, str]:
    env = {}
    for line in service.get("Environment", []):
        for item in shlex.split(line):
            name, _, value = item.partition("=")
            for specifier, path in SPECIFIERS.items():
                value = value.replace(specifier, path)
            env[name] = value
    return env


def env_file(role: str, commented: bool = False) -> dict[str, str]:
    """deploy/ROLE.env.example as systemd reads it; ``commented``: with the commented examples too."""
    env = {}
    for number, line in enumerate((DEPLOY / f"{role}.env.example").read_text().splitlines(), 1):
        line = line.strip()
        if commented and re.match(r"#SWAPMOE_\w+=", line):
            line = line[1:]
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", line)
        assert match, f"{role}.env.example:{number}: not NAME=value: {line!r}"
        env[match[1]] = match[2]
    return env


def serve_command(role: str) -> argparse.ArgumentParser:
    parser = build_parser()
    return next(p for p in env_defaults._leaves(parser) if p.prog.split()[-2:] == [role, "serve"])


def parsed_exec_start(role: str, monkeypatch, env: dict[str, str]) -> argparse.Namespace:
    """ExecStart= parsed by the real parser in the environment the unit gives the process."""
    for name in [n for n in os.environ if n.startswith("SWAPMOE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (exec_start,) = unit(role)["Service"]["ExecStart"]
    words = shlex.split(exec_start)
    assert Path(words[0]).name == "swapmoe"
    return build_parser().parse_args(words[1:])


@pytest.mark.parametrize("role", ROLES)
def test_each_unit_runs_a_simple_service_as_its_own_user_with_restarts_and_hardening(role):
    sections = unit(role)
    assert set(sections) == {"Unit", "Service", "Install"}
    service = {key: values[-1] for key, values in sections["Service"].items()}
    assert service["Type"] == "simple" and service["Restart"] == "on-failure"
    assert service["User"] == service["Group"] == "swapmoe"
    assert service["EnvironmentFile"] == f"/etc/swapmoe/{role}.env"
    assert service["KillSignal"] == "SIGTERM"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes"}.items():
        assert service[key] == value, key
    assert service["StateDirectory"] == service["CacheDirectory"] == f"swapmoe-{role}"
    assert sections["Install"]["WantedBy"] == ["multi-user.target"]
    sysusers = (DEPLOY / "swapmoe.sysusers.conf").read_text()
    assert re.search(r"^u swapmoe ", sysusers, re.M), "the user the units run as is declared"


@pytest.mark.parametrize("role", ROLES)
def test_exec_start_parses_with_the_env_file_and_keeps_state_where_the_unit_may_write(role, monkeypatch):
    service = unit(role)["Service"]
    env = {**unit_environment(service), **env_file(role)}
    args = parsed_exec_start(role, monkeypatch, env)
    assert args.command == role and args.action == "serve"
    # ProtectSystem=strict: the state directory must be the unit's StateDirectory=.
    assert args.state_dir == Path("/var/lib") / service["StateDirectory"][0]
    assert args.host == "0.0.0.0" and args.security == Path("/etc/swapmoe/security")
    if role == "executor":
        assert args.budget == parse_size("2GiB") and args.planner and args.metrics_port == 9464
        assert env["SWAPMOE_STORE_ROOT"].startswith("/var/cache/" + service["CacheDirectory"][0])
    else:
        assert args.control_port == 50053 and args.profiles == [Path("/var/lib/swapmoe-planner/profiles")]


@pytest.mark.parametrize("role", ROLES)
def test_every_documented_value_in_the_env_file_is_one_the_command_accepts(role, monkeypatch):
    env = {name: value for name, value in env_file(role, commented=True).items() if value}
    args = parsed_exec_start(role, monkeypatch, {**unit_environment(unit(role)["Service"]), **env})
    assert args.command == role
    if role == "executor":
        assert args.label == ["class=phone", "site=lab"] and args.insecure is False


@pytest.mark.parametrize("role", ROLES)
def test_the_env_file_documents_every_flag_of_the_command_and_nothing_else(role):
    flags = {env_defaults.variable(role, a) for a in serve_command(role)._actions
             if a.option_strings and not isinstance(a, argparse._HelpAction)}
    documented = set(env_file(role, commented=True))
    assert flags - documented == set(), "flags without a line in the env file"
    assert documented - flags - OTHER_VARIABLES == set(), "variables no flag reads"


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", text)
    assert match, f"a time systemd reads: {text!r}"
    return int(match[1]) * (60 if match[2] == "min" else 1)


def test_the_executor_is_given_longer_to_stop_than_it_drains(monkeypatch):
    service = unit("executor")["Service"]
    env = {**unit_environment(service), **env_file("executor", commented=True)}
    args = parsed_exec_start("executor", monkeypatch, env)
    # The drain, then the planner link's close (up to 5 s), before systemd's SIGKILL.
    assert seconds(service["TimeoutStopSec"][-1]) > args.drain_seconds + 5


def test_the_planner_may_open_a_file_for_two_connections_per_executor(monkeypatch):
    service = unit("planner")["Service"]
    args = parsed_exec_start("planner", monkeypatch, {**unit_environment(service),
                                                      **env_file("planner", commented=True)})
    assert int(service["LimitNOFILE"][-1]) > 2 * args.max_executors


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_both_units(tmp_path):
    """systemd's own check (unknown keys, bad values, specifiers); ExecStart points at this
    environment's ``swapmoe`` so that the binary it checks for exists."""
    swapmoe = shutil.which("swapmoe") or str(Path(sys.executable).with_name("swapmoe"))
    assert Path(swapmoe).exists()
    paths = []
    for role in ROLES:
        text = (DEPLOY / f"swapmoe-{role}.service").read_text()
        paths.append(tmp_path / f"swapmoe-{role}.service")
        paths[-1].write_text(text.replace("/opt/swapmoe/bin/swapmoe", swapmoe))
    verified = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, paths)],
                              capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0 and verified.stdout + verified.stderr == "", verified.stderr


# --- the container file ----------------------------------------------------------------------

INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


class Stage:
    def __init__(self, name: str, parent: "Stage | None"):
        self.name, self.parent = name, parent
        self.instructions: list[tuple[str, str]] = []
        self.args: dict[str, str] = {}
        self.env: dict[str, str] = dict(parent.env) if parent else {}

    def last(self, instruction: str) -> str | None:
        own = [v for i, v in self.instructions if i == instruction]
        return own[-1] if own else self.parent.last(instruction) if self.parent else None

    def expand(self, text: str) -> str:
        values = {**self.env, **self.args}
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0]), text)


def stages() -> dict[str, Stage]:
    with (DEPLOY / "Containerfile").open("rb") as file:
        structure = DockerfileParser(fileobj=file).structure
    found: dict[str, Stage] = {}
    stage = None
    for item in [i for i in structure if i["instruction"] != "COMMENT"]:
        instruction, value = item["instruction"], item["value"]
        assert instruction in INSTRUCTIONS, f"Containerfile:{item['startline'] + 1}: {instruction}"
        if instruction == "FROM":
            image, _, name = value.partition(" AS ")
            stage = found[name.strip()] = Stage(name.strip(), found.get(image.strip()))
            continue
        assert stage is not None or instruction == "ARG", "FROM first (only ARG may come before it)"
        if stage is None:
            continue
        stage.instructions.append((instruction, value))
        if instruction == "ARG":
            name, _, default = value.partition("=")
            stage.args[name] = default
        elif instruction == "ENV":
            for item_ in shlex.split(value):
                name, _, setting = item_.partition("=")
                stage.env[name] = setting
    return found


def extras_installed(stage: Stage) -> set[str]:
    runs = [stage.expand(v) for s in (stage, stage.parent) if s for i, v in s.instructions if i == "RUN"]
    return {extra for run in runs if "pip install" in run
            for group in re.findall(r"swapmoe[^\s\"]*\[([\w,-]+)\]", run) for extra in group.split(",")}


def test_the_container_file_builds_an_executor_and_a_planner_from_one_wheel():
    found = stages()
    assert {"executor", "planner"} <= set(found)
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert extras_installed(found["executor"]) == {"executor"} and extras_installed(found["planner"]) == {"planner"}
    assert all(e in extras for s in found.values() for e in extras_installed(s))
    # The wheel stage copies the project file, the readme and every package folder.
    copied = {w for i, v in found["wheel"].instructions if i == "COPY" for w in shlex.split(v)[:-1]}
    folders = {value.split("/")[0] for value in PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    assert folders | {"pyproject.toml", PYPROJECT["project"]["readme"]} <= copied
    assert all((ROOT / source).exists() for source in copied)


def test_the_executor_image_pins_the_cpu_torch_and_the_planner_image_has_none():
    found = stages()
    runs = " ".join(found["executor"].expand(v) for i, v in found["executor"].instructions if i == "RUN")
    assert '"torch==2.13.0"' in runs, "an unpinned torch pulls a CUDA build"
    assert '--index-url "https://download.pytorch.org/whl/cpu"' in runs
    planner_runs = " ".join(v for i, v in found["planner"].instructions if i == "RUN")
    assert "torch" not in planner_runs


@pytest.mark.parametrize("role, ports", [("executor", {"PORT", "METRICS_PORT"}), ("planner", {"PORT", "CONTROL_PORT"})])
def test_each_image_runs_its_server_as_a_user_on_the_ports_it_exposes(role, ports, monkeypatch):
    stage = stages()[role]
    user = stage.last("USER")
    assert user and user not in {"root", "0"}
    entrypoint, command = json.loads(stage.last("ENTRYPOINT")), json.loads(stage.last("CMD"))
    assert entrypoint == ["swapmoe"] and command[:2] == [role, "serve"]
    exposed = {int(p) for p in stage.last("EXPOSE").split()}
    assert {int(stage.env[f"SWAPMOE_{role.upper()}_{p}"]) for p in ports} == exposed
    assert all(n in OTHER_VARIABLES | {"SWAPMOE_HEALTH_ADDRESS"} or n.startswith(f"SWAPMOE_{role.upper()}_")
               for n in stage.env if n.startswith("SWAPMOE_"))
    # What `docker run` adds (as the file's header shows) and the image's ENV, through the real parser.
    given = {"SWAPMOE_EXECUTOR_MODEL": "/models/m", "SWAPMOE_EXECUTOR_BUDGET": "2GiB"} if role == "executor" else {}
    for name in [n for n in os.environ if n.startswith("SWAPMOE_")]:
        monkeypatch.delenv(name)
    for name, value in {**stage.env, **given}.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(command)
    assert args.host == "0.0.0.0" and args.state_dir == Path("/var/lib/swapmoe/state")
    health_port = int(stage.env["SWAPMOE_HEALTH_ADDRESS"].rsplit(":", 1)[1])
    assert health_port == (args.port if role == "executor" else args.control_port)


def health_probe(stage: Stage) -> list[str]:
    value = stage.last("HEALTHCHECK")
    options, _, command = value.partition("CMD ")
    assert "--start-period" in options and "--timeout" in options
    return json.loads(command)


@pytest.mark.slow
def test_the_health_check_passes_on_a_serving_server_and_fails_otherwise(monkeypatch):
    probe = health_probe(stages()["executor"])
    assert probe == health_probe(stages()["planner"]) and probe[:2] == ["python", "-c"]
    server = transport.start_server(lambda server: None, [])

    def check() -> int:
        env = {**os.environ, "SWAPMOE_HEALTH_ADDRESS": f"127.0.0.1:{server.port}"}
        return subprocess.run([sys.executable, *probe[1:]], env=env, capture_output=True, timeout=30).returncode

    try:
        assert check() == 0
        server.health.enter_graceful_shutdown()  # NOT_SERVING: a draining server is not healthy
        assert check() == 1
    finally:
        server.stop(0)
    assert check() != 0, "nothing listening"


def test_the_build_context_leaves_out_the_environment_and_caches():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".bench-stores", ".git", "**/__pycache__"} <= ignored
    copied = {w for s in stages().values() for i, v in s.instructions if i == "COPY" and "--from" not in v
              for w in shlex.split(v)[:-1]}
    assert not copied & ignored, "a COPY source the context leaves out"
