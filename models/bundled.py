"""Where the bundled checkpoints are (``swapmoe-lm``, ``swapmoe-switch``): a path, nothing more,
so a caller that only needs the demo model imports no torch."""

from __future__ import annotations

from pathlib import Path

MODELS = Path(__file__).resolve().parent
LM_DIR = MODELS / "swapmoe-lm"
SWITCH_DIR = MODELS / "swapmoe-switch"
