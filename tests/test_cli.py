"""The swapmoe command's own errors: precise, on stderr, exit status 2, nothing left running."""

import sys
import threading

import pytest

from swapmoe.orchestration import cli


def run_cli(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(args))
    return exit_.value.code, capsys.readouterr().err


def test_a_budget_below_the_model_minimum_names_the_minimum_and_starts_nothing(capsys, tiny_model_dir):
    code, err = run_cli(capsys, "executor", "serve", "--model", str(tiny_model_dir), "--budget", "1KiB")
    assert code == 2
    assert err.startswith("swapmoe: error: budget_bytes: 1.0 KiB is below this model's minimum of ")
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("expert-loader", "forward"))]


def test_a_directory_that_is_not_a_checkpoint_is_a_clear_error(capsys, tmp_path):
    code, err = run_cli(capsys, "executor", "serve", "--model", str(tmp_path), "--budget", "1GiB")
    assert code == 2 and f"{tmp_path} is not a checkpoint directory (no config.json)" in err


def test_a_malformed_size_is_rejected_before_anything_loads(capsys):
    code, err = run_cli(capsys, "budget", "--executor", "127.0.0.1:1", "lots")
    assert code == 2 and "argument budget: malformed size 'lots'" in err


def test_a_command_whose_extra_is_not_installed_names_the_extra(capsys, monkeypatch, tmp_path):
    """A control node installs only the base package: serving a model says what to install."""
    for name in [m for m in list(sys.modules) if m == "torch" or m.startswith("swapmoe.executor")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails as if absent
    code, err = run_cli(capsys, "executor", "serve", "--model", str(tmp_path), "--budget", "1GiB")
    assert code == 2
    assert 'this command needs torch, which this installation lacks; install it with: pip install "swapmoe[executor]"' in err
