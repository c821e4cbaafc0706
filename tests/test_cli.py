"""The swapmoe command's own errors: one line `swapmoe: error: ...` on stderr, exit status 2,
never a traceback, and start-up mistakes caught before a model loads; --version, help on every
flag, and server flags' defaults from SWAPMOE_<ROLE>_<FLAG>."""

import argparse
import re
import socket
import sys
import threading

import pytest

from swapmoe.cli import main as cli


_STARTED: list[threading.Thread] = []  # threads the last run_cli left running


def run_cli(capsys, *args) -> tuple[int, str]:
    before = set(threading.enumerate())
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(args))
    _STARTED[:] = [t for t in threading.enumerate() if t not in before]
    return exit_.value.code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """The error line, after checking it is the only thing on stderr."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("swapmoe: error: "), err
    return lines[0]


def no_model_loaded() -> bool:
    """The last command started no model's threads (other tests' engines may be running)."""
    return not [t.name for t in _STARTED if t.name.startswith(("expert-loader", "forward"))]


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



# -- start-up mistakes -------------------------------------------------------------------------

def test_a_budget_below_the_model_minimum_names_the_minimum_and_starts_nothing(capsys, tiny_model_dir):
    code, err = run_cli(capsys, "executor", "serve", "--model", str(tiny_model_dir), "--budget", "1KiB")
    assert code == 2
    assert one_error_line(err).startswith("swapmoe: error: budget_bytes: 1.0 KiB is below this model's minimum of ")
    assert no_model_loaded()


def test_a_directory_that_is_not_a_checkpoint_is_a_clear_error(capsys, tmp_path):
    code, err = run_cli(capsys, "executor", "serve", "--model", str(tmp_path), "--budget", "1GiB")
    assert code == 2
    assert one_error_line(err) == f"swapmoe: error: --model: {tmp_path} is not a checkpoint directory (no config.json)"


def test_a_model_directory_that_does_not_exist_is_named(capsys, tmp_path):
    code, err = run_cli(capsys, "executor", "serve", "--model", str(tmp_path / "nope"), "--budget", "1GiB")
    assert code == 2 and one_error_line(err) == f"swapmoe: error: --model: {tmp_path / 'nope'} does not exist"


def test_a_file_given_as_the_model_directory_is_named(capsys, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    code, err = run_cli(capsys, "executor", "serve", "--model", str(tmp_path / "model.safetensors"), "--budget", "1G")
    assert code == 2 and f"--model: {tmp_path / 'model.safetensors'} is not a directory" in one_error_line(err)


def test_a_dense_checkpoint_is_refused_from_its_config_before_its_weights_load(capsys, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=64)).save_pretrained(tmp_path)
    capsys.readouterr()  # save_pretrained's progress bar
    code, err = run_cli(capsys, "executor", "serve", "--model", str(tmp_path), "--budget", "1GiB")
    assert code == 2
    line = one_error_line(err)
    assert line.startswith("swapmoe: error: --model: model class LlamaForCausalLM (model_type 'llama') is not "
                           "supported; supported model types: ")
    assert "mixtral" in line and no_model_loaded()


def test_a_port_in_use_is_named_before_the_model_loads(capsys, tiny_model_dir, taken_port):
    code, err = run_cli(capsys, "executor", "serve", "--model", str(tiny_model_dir), "--budget", "1GiB",
                        "--port", str(taken_port))
    assert code == 2 and one_error_line(err) == f"swapmoe: error: --port: port {taken_port} on 127.0.0.1 is in use"
    assert no_model_loaded()


def test_a_metrics_port_in_use_is_named_too(capsys, tiny_model_dir, taken_port):
    code, err = run_cli(capsys, "executor", "serve", "--model", str(tiny_model_dir), "--budget", "1GiB",
                        "--port", "0", "--metrics-port", str(taken_port))
    assert code == 2 and one_error_line(err) == (f"swapmoe: error: --metrics-port: port {taken_port} on 127.0.0.1 "
                                                 "is in use")


def test_the_planner_names_a_port_in_use_and_a_state_dir_that_is_a_file(capsys, taken_port, tmp_path):
    code, err = run_cli(capsys, "planner", "serve", "--port", str(taken_port))
    assert code == 2 and one_error_line(err) == f"swapmoe: error: --port: port {taken_port} on 127.0.0.1 is in use"
    (tmp_path / "state").write_text("not a directory")
    code, err = run_cli(capsys, "planner", "serve", "--port", "0", "--state-dir", str(tmp_path / "state"))
    assert code == 2 and one_error_line(err) == f"swapmoe: error: --state-dir: {tmp_path / 'state'} is not a directory"


def test_the_control_node_names_a_port_in_use(capsys, taken_port):
    code, err = run_cli(capsys, "fleet", "serve", "--planner", "127.0.0.1", "--port", str(taken_port))
    assert code == 2 and one_error_line(err) == f"swapmoe: error: --port: port {taken_port} on 127.0.0.1 is in use"


def test_a_malformed_size_is_rejected_before_anything_loads(capsys):
    code, err = run_cli(capsys, "budget", "--executor", "127.0.0.1:1", "lots")
    assert code == 2 and "argument budget: malformed size 'lots'" in one_error_line(err)


def test_a_budget_typo_is_one_line_listing_the_spellings(capsys, tiny_model_dir):
    code, err = run_cli(capsys, "executor", "serve", "--model", str(tiny_model_dir), "--budget", "2GB8")
    line = one_error_line(err)
    assert code == 2 and "argument --budget: malformed size '2GB8'" in line and "2Gi" in line and "MiB" in line
    assert line.endswith("(see `swapmoe executor serve --help`)")


def test_a_port_out_of_range_is_a_usage_error(capsys):
    code, err = run_cli(capsys, "planner", "serve", "--port", "70000")
    assert code == 2 and "argument --port: a port is 0 (pick a free one) to 65535, got 70000" in one_error_line(err)


def test_a_command_whose_extra_is_not_installed_names_the_extra(capsys, monkeypatch, tmp_path):
    """A control node installs only the base package: serving a model says what to install."""
    for name in [m for m in list(sys.modules) if m == "torch" or m.startswith("swapmoe.executor")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails as if absent
    code, err = run_cli(capsys, "executor", "serve", "--model", str(tmp_path), "--budget", "1GiB")
    assert code == 2
    assert 'this command needs torch, which this installation lacks; install it with: pip install "swapmoe[executor]"' in err


# -- gRPC failures -------------------------------------------------------------------------------

def test_a_server_that_is_not_there_is_unavailable_naming_its_address(capsys, closed_port):
    code, err = run_cli(capsys, "describe", "--executor", f"127.0.0.1:{closed_port}")
    assert code == 2 and one_error_line(err).startswith(f"swapmoe: error: executor 127.0.0.1:{closed_port}: UNAVAILABLE: ")
    code, err = run_cli(capsys, "fleet", "nodes", "--fleet", f"127.0.0.1:{closed_port}")
    assert code == 2 and one_error_line(err).startswith(
        f"swapmoe: error: control node 127.0.0.1:{closed_port}: UNAVAILABLE: ")


def test_a_budget_the_executor_refuses_is_invalid_argument_naming_the_field(capsys, tiny_engine):
    from swapmoe.executor.server import serve

    server = serve(tiny_engine)
    try:
        code, err = run_cli(capsys, "budget", "--executor", f"127.0.0.1:{server.port}", "1KiB")
    finally:
        server.stop(grace=1)
    assert code == 2
    assert one_error_line(err).startswith(f"swapmoe: error: executor 127.0.0.1:{server.port}: INVALID_ARGUMENT: "
                                          "budget_bytes: 1.0 KiB is below this model's minimum of ")
    assert tiny_engine.budget_bytes == 1 << 30


def test_the_status_of_an_unknown_executor_is_not_found(capsys):
    from swapmoe.planner_service.policy import PlannerSettings
    from swapmoe.planner_service.server import serve

    planner, _ = serve("127.0.0.1:0", settings=PlannerSettings(profile_devices=False))
    try:
        code, err = run_cli(capsys, "planner", "status", "--planner", f"127.0.0.1:{planner.port}", "ghost")
    finally:
        planner.stop(0.5)
    assert code == 2 and one_error_line(err) == (f"swapmoe: error: planner 127.0.0.1:{planner.port}: NOT_FOUND: "
                                                 "node_ids: unknown executors ['ghost']")


def test_routing_through_a_fleet_with_no_such_model_or_no_control_node_is_one_line(capsys, closed_port):
    from swapmoe.orchestration.fleet import serve as serve_fleet
    from swapmoe.planner_service.policy import PlannerSettings
    from swapmoe.planner_service.server import serve

    planner, _ = serve("127.0.0.1:0", settings=PlannerSettings(profile_devices=False))
    control = serve_fleet([f"127.0.0.1:{planner.port}"])
    try:
        code, err = run_cli(capsys, "generate", "--fleet", f"127.0.0.1:{control.port}", "--model", "ghost", "hi")
    finally:
        control.stop(0.5)
        planner.stop(0.5)
    assert code == 2 and "ghost" in one_error_line(err)
    code, err = run_cli(capsys, "generate", "--fleet", f"127.0.0.1:{closed_port}", "--model", "ghost", "hi")
    assert code == 2 and f"127.0.0.1:{closed_port}" in one_error_line(err)


# -- addresses -----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, flag, expected", [
    (["describe", "--executor", "jetson-7"], "executor", "jetson-7:50051"),
    (["planner", "status", "--planner", "planner.lan"], "planner", "planner.lan:50052"),
    (["fleet", "nodes", "--fleet", "[::1]"], "fleet", "[::1]:50053"),
    (["generate", "--fleet", "10.0.0.2", "--model", "m", "hi"], "fleet", "10.0.0.2:50053"),
    (["executor", "serve", "--model", "m", "--budget", "1G", "--planner", "hub"], "planner", "hub:50052"),
    (["describe", "--executor", "[::1]:6000"], "executor", "[::1]:6000"),
])
def test_a_bare_host_dials_the_roles_default_port(argv, flag, expected):
    assert getattr(cli.build_parser().parse_args(argv), flag) == expected


# -- the parser ----------------------------------------------------------------------------------

def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"swapmoe {version('swapmoe')}\n"


def every_parser(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from every_parser(sub)


def test_every_command_flag_and_argument_says_what_it_is_for():
    missing = []
    for parser in every_parser(cli.build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):  # each command's line in its group's help
                missing += [f"{parser.prog} {c.dest}" for c in action._choices_actions if not c.help]
                continue
            own_help = re.sub(r"\s*\[env SWAPMOE_\w+\]$", "", action.help or "")  # the env note is not help
            if not isinstance(action, argparse._HelpAction) and not own_help.strip():
                missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
    assert not missing


# -- environment defaults ------------------------------------------------------------------------

def test_every_server_flag_names_its_environment_variable_in_its_help():
    for parser in every_parser(cli.build_parser()):
        words = parser.prog.split()
        if words[-1] != "serve":
            continue
        for action in parser._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction) and \
                    action.help != argparse.SUPPRESS:  # a hidden flag (a removed one, refused) has no help
                assert action.help.endswith(f"[env SWAPMOE_{words[1].upper()}_{action.dest.upper()}]"), action.help


def test_required_flags_are_satisfied_by_the_environment(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SWAPMOE_EXECUTOR_MODEL", str(tmp_path / "from-env"))
    monkeypatch.setenv("SWAPMOE_EXECUTOR_BUDGET", "2Gi")
    monkeypatch.setenv("SWAPMOE_EXECUTOR_PORT", "0")
    args = cli.build_parser().parse_args(["executor", "serve"])
    assert (args.model, args.budget, args.port) == (str(tmp_path / "from-env"), 2 << 30, 0)
    code, err = run_cli(capsys, "executor", "serve")
    assert code == 2 and one_error_line(err) == f"swapmoe: error: --model: {tmp_path / 'from-env'} does not exist"


def test_the_command_line_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("SWAPMOE_FLEET_PLANNER", "a, b:7000")
    monkeypatch.setenv("SWAPMOE_FLEET_PORT", "6000")
    assert cli.build_parser().parse_args(["fleet", "serve"]).planner == ["a:50052", "b:7000"]
    args = cli.build_parser().parse_args(["fleet", "serve", "--planner", "c", "--planner", "d", "--port", "1"])
    assert (args.planner, args.port) == (["c:50052", "d:50052"], 1)


def test_switches_read_the_usual_words(monkeypatch, capsys):
    monkeypatch.setenv("SWAPMOE_PLANNER_NO_DEVICE_PROFILING", "yes")
    assert cli.build_parser().parse_args(["planner", "serve"]).no_device_profiling is True
    monkeypatch.setenv("SWAPMOE_PLANNER_NO_DEVICE_PROFILING", "off")
    assert cli.build_parser().parse_args(["planner", "serve"]).no_device_profiling is False
    monkeypatch.setenv("SWAPMOE_PLANNER_NO_DEVICE_PROFILING", "perhaps")
    code, err = run_cli(capsys, "planner", "serve")
    assert code == 2 and one_error_line(err) == ("swapmoe: error: SWAPMOE_PLANNER_NO_DEVICE_PROFILING='perhaps': "
                                                 "expected one of 1, true, yes, on, 0, false, no, off")


def test_a_bad_environment_value_names_the_variable_and_only_its_own_command_reads_it(capsys, monkeypatch):
    monkeypatch.setenv("SWAPMOE_EXECUTOR_BUDGET", "lots")
    monkeypatch.setenv("SWAPMOE_EXECUTOR_MODEL", "/models/m")
    code, err = run_cli(capsys, "executor", "serve")
    assert code == 2 and one_error_line(err).startswith("swapmoe: error: SWAPMOE_EXECUTOR_BUDGET='lots': "
                                                        "malformed size 'lots': expected a number of bytes")
    assert cli.build_parser().parse_args(["executor", "serve", "--budget", "1G"]).budget == 10**9
    assert cli.build_parser().parse_args(["planner", "serve"]).port == 50052
