"""The bench runs end to end (its figures are measurements, not assertions).

Only the quickest path: one round of unary calls against the two ceiling
servers, so that the load generators, the runner and the report keep working
as the code around them changes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_quick_run_reports_ceiling_figures(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    arguments = [
        "--quick",
        "--rounds=1",
        "--systems=ceiling",
        "--figures=unary",
        f"--output={output}",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "bench", *arguments],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr

    results = output.read_text(encoding="utf-8")
    assert "python -m bench " + " ".join(arguments) in results
    for system in ("purerpc", "grpc shell"):
        row = re.search(
            rf"\| resolve/s, 4 callers +\| {system} +\| ([\d,]+)/s", results
        )
        assert row, f"no figure for {system}:\n{results}"
        assert int(row.group(1).replace(",", "")) > 0
    # The ratio of the two, measured in the same round.
    assert re.search(r"grpc shell / purerpc +\| \d+\.\d\dx", results), results
