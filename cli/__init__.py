"""``swapmoe.cli``: the ``swapmoe`` command (``main``) and what only it needs: flag types and
defaults, one module per command group, the calls it makes and prints (``client``), the ``demo``.
Kept apart from the processes it starts, so each server's code reads without argparse.
"""
