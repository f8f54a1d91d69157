"""Run the prunelab CLI in a fresh process and read its JSON result (shared by the benchmark scripts)."""

from __future__ import annotations

import json
import subprocess
import sys


def prunelab(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "prunelab.cli", *args, "--json"], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"prunelab {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout[result.stdout.index("{"):])
