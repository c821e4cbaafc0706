"""``swapmoe.planner_service``: the planner process. Executors dial in (``server``), the
``registry`` keeps what each one runs and should run, and the ``planner`` chooses plans: a
genetic ``search`` over the performance models (``objectives``) for every budget (``frontier``),
for the workload recognised in each executor's telemetry (``workload``), from the profiles it
keeps (``profiles``).
"""
