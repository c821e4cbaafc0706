"""``swapmoe.orchestration``: the control node and fleet work: fleet-wide staged rollouts
(``fleet`` over ``rollouts``, ``rollout_driver``, ``rollout_store``, ``planners``), a local fleet
from a file (``fleet_spec``, ``fleet_up``), client-side request ``balancing`` over the fleet, and
starting servers as processes (``processes``). The CLI that drives it is ``swapmoe.cli``.
"""
