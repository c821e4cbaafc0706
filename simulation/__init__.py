"""``swapmoe.simulation``: a simulated fleet of executors (``fleet``, each a ``node``) on the
planner's real Connect protocol, with no model. Its own package because tests and benchmarks
both load planners with it.
"""
