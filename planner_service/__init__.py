"""``swapmoe.planner_service``: the planner process. Executors dial in (``server``), the
``registry`` keeps what each one runs and should run, and ``planning`` chooses plans.
"""
