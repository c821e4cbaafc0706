"""``swapmoe demo`` shows the planner whole, as a new user runs it: the even split while the device
is profiled, a searched plan with predicted and measured figures, a budget cut answered from the
frontier, and a workload shift answered with that workload's own plan."""

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_the_demo_shows_every_stage_of_planning_in_order():
    done = subprocess.run([sys.executable, "-m", "swapmoe.cli.main", "demo"], capture_output=True, text=True,
                          timeout=420)
    out = done.stdout
    assert done.returncode == 0, done.stdout + done.stderr
    stages = [int(n) for n in re.findall(r"^=== (\d)\. ", out, flags=re.M)]
    assert stages == [1, 2, 3, 4], out
    even, searched, cut, shift = re.split(r"^=== \d\. .*$", out, flags=re.M)[1:]
    assert "even split" in even and "device profile: profiling" in even
    assert "device profile: ready" in searched and "predicted: perplexity" in searched
    assert re.search(r"measured: [1-9][\d.]* tokens/s", searched)
    assert "budget change to" in cut and "searched plan for workload" in cut
    workload = re.search(r"the workload shift to '(\w+)'", out).group(1)
    assert f"workload: {workload};" in shift and f"searched plan for workload '{workload}'" in shift
