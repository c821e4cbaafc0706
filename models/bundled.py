"""Where the bundled checkpoints are (``swapmoe-lm``, ``swapmoe-switch``) and the accuracy
profiles that ship with them: paths, nothing more, so a caller that only needs the demo model
imports no torch."""

from __future__ import annotations

from pathlib import Path

MODELS = Path(__file__).resolve().parent
LM_DIR = MODELS / "swapmoe-lm"
SWITCH_DIR = MODELS / "swapmoe-switch"
# The bundled models' stored profiles (``ROOT/<fingerprint>/accuracy/<set>/``): every planner
# finds them, after the roots it is given, so a bundled model is planned for without a flag.
PROFILES = MODELS / "profiles"
