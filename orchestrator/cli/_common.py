"""What several commands share."""

from __future__ import annotations

from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "local.yaml"
