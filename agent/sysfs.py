"""Reading small kernel text files (sysfs attributes) for the power sensors (:mod:`agent.power`) and the thermal
sources (:mod:`agent.thermal`).

Contract: :func:`read_text` never raises for a missing, unreadable or undecodable file: it returns ``None``, so
discovery can probe paths that may not exist on this device. Standard library only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def read_text(path: Path) -> Optional[str]:
    """The file's text, stripped; None when it is missing or cannot be read."""
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None
