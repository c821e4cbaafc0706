"""The fleet file of ``swapmoe fleet up``: read as a whole, every mistake named by table and key,
node ids and planners assigned, and the command line of each process; no process starts."""

import hashlib
import textwrap

import pytest

from swapmoe.core.errors import InvalidField
from swapmoe.orchestration import fleet_spec
from swapmoe.orchestration.fleet_up import control_args, executor_args, planner_args

EXAMPLE = """
[planner]
port = 50052
state_dir = "fleet-state/planner"
[control]
port = 50053
[[executor]]
model = "models/swapmoe-lm"
budget = "20MiB"
count = 2
name = "phone"
labels = { class = "phone", region = "eu" }
planner = 0
[[executor]]
model = "models/swapmoe-lm"
budget = 1048576
[[device]]
address = "10.0.0.7:50051"
node_id = "jetson-1"
"""


@pytest.fixture
def base(tmp_path):
    """A directory holding the fleet file, with a checkpoint directory (only its config.json)."""
    (tmp_path / "models" / "swapmoe-lm").mkdir(parents=True)
    (tmp_path / "models" / "swapmoe-lm" / "config.json").write_text("{}")
    return tmp_path


def load(base, text):
    path = base / "fleet.toml"
    path.write_text(textwrap.dedent(text))
    return fleet_spec.load(path)


def error_of(base, text) -> str:
    with pytest.raises(ValueError) as error:
        load(base, text)
    return str(error.value)


def test_the_example_file_gives_planner_control_executors_and_devices_with_paths_from_the_files_directory(base):
    spec = load(base, EXAMPLE)
    assert [p.port for p in spec.planners] == [50052]
    assert spec.planners[0].state_dir == base / "fleet-state" / "planner"
    assert spec.control.port == 50053 and spec.control.state_dir is None
    assert [e.node_id for e in spec.executors] == ["phone-0", "phone-1", "swapmoe-lm-0"]
    phone = spec.executors[0]
    assert phone.model == base / "models" / "swapmoe-lm"
    assert phone.budget_bytes == 20 << 20 and spec.executors[2].budget_bytes == 1 << 20
    assert phone.labels == {"class": "phone", "region": "eu"} and spec.executors[2].labels == {}
    assert [e.planner for e in spec.executors] == [0, 0, 0]
    assert [(d.node_id, d.address, d.planner) for d in spec.devices] == [("jetson-1", "10.0.0.7:50051", 0)]
    assert fleet_spec.model_label(phone.model) == "swapmoe-lm"


def test_nodes_without_a_planner_are_spread_over_planners_by_a_stable_hash_of_their_node_id(base):
    spec = load(base, """
        [[planner]]
        [[planner]]
        [[planner]]
        [[executor]]
        model = "models/swapmoe-lm"
        budget = "1MiB"
        count = 12
        [[executor]]
        model = "models/swapmoe-lm"
        budget = "1MiB"
        name = "pinned"
        planner = 2
    """)
    assert len(spec.planners) == 3 and all(p.port == 0 for p in spec.planners)
    spread = {e.node_id: e.planner for e in spec.executors}
    assert spread["pinned-0"] == 2
    assert {spread[f"swapmoe-lm-{i}"] for i in range(12)} == {0, 1, 2}
    assert all(spread[n] == fleet_spec.planner_for(n, 3) for n in spread if n.startswith("swapmoe-lm"))
    digest = hashlib.sha256(b"swapmoe-lm-0").digest()
    assert fleet_spec.planner_for("swapmoe-lm-0", 3) == int.from_bytes(digest[:8], "big") % 3  # the same everywhere


def test_a_file_without_planner_or_control_tables_gets_one_of_each_on_free_ports(base):
    spec = load(base, '[[executor]]\nmodel = "models/swapmoe-lm"\nbudget = "1MiB"\n')
    assert len(spec.planners) == 1 and spec.planners[0].port == 0 and spec.control.port == 0


@pytest.mark.parametrize("change, expected", [
    (('budget = 1048576', 'budget = "lots"'), "executor[1].budget: malformed size 'lots'"),
    (('budget = 1048576', 'budget = true'), "executor[1].budget: expected a size"),
    (('count = 2', 'count = 0'), "executor[0].count: expected an integer from 1 to 64, got 0"),
    (('count = 2', 'count = "2"'), "executor[0].count: expected an integer"),
    (('name = "phone"', 'nmae = "phone"'), "executor[0].nmae: unknown key; expected one of"),
    (('planner = 0', 'planner = 1'), "executor[0].planner: expected an integer from 0 to 0, got 1"),
    (('region = "eu"', 'region = 3'), "executor[0].labels.region: a label value is a string"),
    (('class = "phone"', '"bad key!" = "x"'), "executor[0].labels['bad key!']: a label key is"),
    (('model = "models/swapmoe-lm"\nbudget = 1048576', 'budget = 1048576'), "executor[1].model: is required"),
    (('model = "models/swapmoe-lm"\nbudget = 1048576', 'model = "models/nothing"\nbudget = 1048576'),
     "executor[1].model: no checkpoint at"),
    (('address = "10.0.0.7:50051"', 'address = "10.0.0.7"'), "device[0].address: expected HOST:PORT"),
    (('node_id = "jetson-1"', ''), "device[0].node_id: is required"),
    (('node_id = "jetson-1"', 'node_id = "phone-1"'), "'phone-1' is used twice"),
    (('port = 50053', 'port = 50052'), "control.port: port 50052 is also planner[0]'s"),
    (('port = 50053', 'port = 70000'), "control.port: expected an integer from 0 to 65535"),
    (('[control]', '[controller]'), "controller: unknown key"),
    (('[control]', '[[control]]\n[[control]]'), "control: there is one control node"),
    (('state_dir = "fleet-state/planner"', 'state_dir = ""'), "planner.state_dir: expected a non-empty string"),
    (('count = 2', 'count = 2\nargs = "--threads 1"'), "executor[0].args: expected a list of strings"),
])
def test_every_mistake_names_its_table_and_key(base, change, expected):
    old, new = change
    assert old in EXAMPLE
    message = error_of(base, EXAMPLE.replace(old, new, 1))
    assert expected in message


def test_a_fleet_with_nothing_to_run_and_a_file_that_is_not_toml_are_refused(base):
    assert "the fleet has no executors" in error_of(base, "[planner]\nport = 50052\n")
    assert "not valid TOML" in error_of(base, "[planner\n")
    with pytest.raises(ValueError, match="cannot read the fleet file"):
        fleet_spec.load(base / "missing.toml")
    assert issubclass(InvalidField, ValueError)


def test_executors_sharing_a_base_port_get_consecutive_ports_and_a_state_directory_each(base):
    spec = load(base, """
        [[executor]]
        model = "models/swapmoe-lm"
        budget = "1MiB"
        count = 3
        port = 6000
        state_dir = "state"
    """)
    assert [e.port for e in spec.executors] == [6000, 6001, 6002]
    assert [e.state_dir for e in spec.executors] == [base / "state" / f"swapmoe-lm-{i}" for i in range(3)]


def test_each_process_gets_its_planner_node_id_labels_and_the_extra_arguments_of_its_role(base):
    spec = load(base, EXAMPLE.replace('count = 2', 'count = 2\nargs = ["--threads", "1"]'))
    extra = {"executor": ["--security", "certs"], "planner": ["--security", "p"], "control": ["--security", "c"]}
    args = executor_args(spec.executors[1], "127.0.0.1:50052", extra)
    assert args[:2] == ["executor", "serve"]
    pairs = dict(zip(args[2::2], args[3::2]))
    assert pairs["--model"] == str(base / "models" / "swapmoe-lm") and pairs["--budget"] == str(20 << 20)
    assert pairs["--planner"] == "127.0.0.1:50052" and pairs["--node-id"] == "phone-1"
    assert [args[i + 1] for i, a in enumerate(args) if a == "--label"] == ["class=phone", "region=eu"]
    assert args[-4:] == ["--threads", "1", "--security", "certs"]
    assert planner_args(spec.planners[0], extra) == ["planner", "serve", "--host", "127.0.0.1", "--port", "50052",
                                                     "--state-dir", str(base / "fleet-state" / "planner"),
                                                     "--security", "p"]
    control = control_args(spec.control, ["127.0.0.1:1", "127.0.0.1:2"], extra)
    assert control == ["fleet", "serve", "--host", "127.0.0.1", "--port", "50053", "--planner", "127.0.0.1:1",
                       "--planner", "127.0.0.1:2", "--security", "c"]


def test_a_server_bound_to_every_interface_is_dialled_on_loopback():
    assert fleet_spec.dial_address("0.0.0.0", 50052) == "127.0.0.1:50052"
    assert fleet_spec.dial_address("10.0.0.2", 50052) == "10.0.0.2:50052"
