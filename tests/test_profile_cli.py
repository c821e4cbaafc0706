"""``swapmoe profile``: a stored profile shows as a table and as plots; bad input is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from swapmoe.cli import main as cli
from swapmoe.profiler import artifacts
from swapmoe.profiler.configs import sample_many


def run_cli(capsys, *args) -> tuple[int, str, str]:
    try:
        cli.main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def accuracy_dir(tmp_path):
    """An accuracy profile as a run leaves it: its description and the scored configurations."""
    directory = artifacts.accuracy_dir(tmp_path, "f00d", "profiling-lm-1x8")
    artifacts.write_json(directory / "profile.json", "accuracy-profile",
                         dict(model_fingerprint="f00d", seed=0, num_experts=[4, 4], profiling_set={}))
    for c in [*sample_many([4, 4], 14, seed=2)]:
        ppl = 10.0 + 5 * (8 - sum(c.experts_per_layer)) + 1 / c.update_frequency
        artifacts.append_score(directory / artifacts.SCORES,
                               dict(key=c.key, experts_per_layer=list(c.experts_per_layer),
                                    update_frequency=c.update_frequency, accuracy={"mix": ppl}, seconds=0.1))
    return directory


@pytest.mark.slow
def test_show_prints_the_fitted_summary_and_writes_plots(capsys, accuracy_dir, tmp_path):
    code, out, err = run_cli(capsys, "profile", "show", str(accuracy_dir), "--plots", str(tmp_path / "plots"))
    assert code == 0, err
    assert "| mix |" in out and "E_accuracy held-out mean rel. error" in out
    png = tmp_path / "plots" / "accuracy_mix.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (accuracy_dir / "e_accuracy.json").exists()


def test_show_of_a_directory_without_a_profile_is_one_error_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "profile", "show", str(tmp_path))
    assert code == 2 and err.strip() == f"swapmoe: error: {tmp_path} holds no profile (no summary.md or profile.json)"


def test_accuracy_profiling_of_a_directory_that_is_not_a_checkpoint_is_refused(capsys, tmp_path):
    code, _, err = run_cli(capsys, "profile", "accuracy", "--model", str(tmp_path))
    assert code == 2 and "is not a checkpoint directory (no config.json)" in err


def test_device_profiling_needs_an_executor_or_a_planner(capsys):
    code, _, err = run_cli(capsys, "profile", "device")
    assert code == 2 and "one of the arguments --executor --planner is required" in err


@pytest.mark.slow
def test_device_profiling_of_a_served_executor_is_stored_shown_and_plotted(capsys, tiny_engine, tmp_path):
    from swapmoe.executor.server import serve
    from swapmoe.profiler.report import load_device

    server = serve(tiny_engine)
    try:
        code, out, err = run_cli(capsys, "profile", "device", "--executor", f"127.0.0.1:{server.port}",
                                 "--repeats", "1", "--sweep-tokens", "4", "--root", str(tmp_path / "profiles"))
    finally:
        server.stop(grace=1)
    assert code == 0, err
    directory = Path(out.strip().splitlines()[-1].removeprefix("profile: "))
    assert directory.is_relative_to(tmp_path / "profiles")
    profile = load_device(directory)
    assert profile.node_id == "test-node" and len(profile.layers) == tiny_engine.layout.num_layers
    assert "Update-frequency sweep" in out and "100.0% done" in err
    code, out, err = run_cli(capsys, "profile", "show", str(directory), "--plots", str(tmp_path / "plots"))
    assert code == 0, err
    assert (tmp_path / "plots" / "update_frequency_sweep.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--set", "summarization"], "is a decoder-only model; profiling set 'summarization' does not fit it"),
    (["--configurations", "0"], "configurations must be at least 1"),
    (["--workers", "-1"], "workers must be 0 (one per CPU) or more"),
    (["--max-resident", "1KiB"], "max_resident_bytes 1024 (1.0 KiB) is below one expert slot per layer"),
    (["--max-resident", "4XB"], "argument --max-resident: malformed size '4XB'"),
])
def test_accuracy_profiling_refuses_bad_settings_before_starting_ray(capsys, tiny_model_dir, args, message):
    code, _, err = run_cli(capsys, "profile", "accuracy", "--model", str(tiny_model_dir), *args)
    assert code == 2 and message in err
