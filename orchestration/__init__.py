"""``swapmoe.orchestration``: the ``swapmoe`` command (``cli``, with ``client`` for the calls it
makes), the control node for fleet-wide rollouts (``fleet``), the ``demo``, and starting
servers as processes (``processes``).
"""
