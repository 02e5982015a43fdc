"""The trials of one execution, run as a batch: each into its own folder, each that completed
marked for the runner, each that failed leaving its traceback while the others go on. Light
on purpose (no torch): the runner reads the markers."""
from __future__ import annotations

import logging
import traceback
from pathlib import Path

log = logging.getLogger(__name__)

COMPLETED_FILE = ".completed"   # written by run_trials for the runner, removed before the commit



FAILED_FILE = "failed.txt"       # the traceback of a trial that failed



def run_trials(step, trials: list[dict]) -> list[dict | None]:
    """``step(**trial)`` for every trial of one execution, each into its own ``out_dir``.

    A trial that raises leaves its traceback in ``failed.txt`` and its result is None; the
    other trials still run. Each trial that completes is marked for the runner, which commits
    exactly those."""
    results = []
    for trial in trials:
        out_dir = Path(trial["out_dir"])
        try:
            result = step(**trial)
        except Exception:
            text = traceback.format_exc()
            log.error("trial with seed %s failed:\n%s", trial["spec"].get("seed"), text)
            (out_dir / FAILED_FILE).write_text(text)
            results.append(None)
        else:
            (out_dir / COMPLETED_FILE).write_text("")
            results.append(result)
    return results



def raise_if_failed(trials: list[dict], results: list[dict | None]) -> None:
    """End of a trials notebook: fail the execution when a trial failed (after every trial ran)."""
    failed = [Path(t["out_dir"], FAILED_FILE).read_text().strip().splitlines()[-1]
              for t, r in zip(trials, results) if r is None]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(trials)} trials failed: " + "; ".join(failed))
