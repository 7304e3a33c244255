"""Shared by the bench scripts: the run metadata every result file carries."""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone


def run_metadata() -> dict:
    """Command, UTC date and machine of this run."""
    return {"command": " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
