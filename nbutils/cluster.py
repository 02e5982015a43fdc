"""Running a grid's stages on Dask: a local cluster sized to the machine, or any existing one.

Each stage is one Dask task; the tasks of the stages it reads are its dependencies, so Dask
starts a stage as soon as its inputs exist and runs independent stages side by side. A task
never raises for a failing notebook (:func:`nbutils.runner.run_stage` turns it into a
"failed" outcome, and the stages that need it into "skipped" ones), so one failure does not
stop independent work. Artifacts are committed atomically by the store: interrupting a run
loses only the stages in flight, and running it again reuses everything already committed.

On a local cluster every worker is a process running one stage at a time, and the cores
are shared out between the workers (``OMP_NUM_THREADS`` for the kernels they start), so two
stages on two cores do not fight over threads.

To use a cluster of GPU machines, start a Dask scheduler and workers there (for SLURM,
``dask-jobqueue``; see the README) and pass its address: ``python -m nbutils run
params/paper --scheduler tcp://host:8786``. The workers must see the same ``outputs/`` folder
(a shared file system) and have this project installed.
"""
from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runner import Outcome, Stage
    from .store import ArtifactStore

log = logging.getLogger(__name__)


def run_on_dask(stages: list["Stage"], store: "ArtifactStore", kernel: str | None, *, workers: int,
                scheduler: str | None = None, out=sys.stdout) -> list["Outcome"]:
    """Submit every stage as a task after the tasks it reads; return the outcomes in stage order."""
    from dask.distributed import Client, LocalCluster, as_completed

    from .runner import Outcome, default_workers, report_line, run_stage

    for name in ("distributed", "tornado", "bokeh"):   # keep the run's output to the stages' progress
        logging.getLogger(name).setLevel(logging.WARNING)
    cluster = None
    if scheduler is None:
        threads = max(1, default_workers() // workers)
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=logging.ERROR)
        client = Client(cluster)
    else:
        threads = None   # the remote workers' own settings
        client = Client(scheduler)
    print(f"Dask: {len(client.scheduler_info()['workers'])} workers"
          + (f" ({threads} thread{'s' if threads > 1 else ''} each)" if threads else f" at {scheduler}"),
          file=out, flush=True)
    try:
        futures = {}
        for stage in stages:
            needs = [futures[id(s)] for s in stage.inputs.values()]
            futures[id(stage)] = client.submit(run_stage, stage, store, kernel, needs, threads,
                                               key=f"{stage.kind}-{stage.key}", pure=False)
        stage_of = {f.key: stage for stage, f in zip(stages, futures.values())}
        outcomes: dict[str, Outcome] = {}
        for i, future in enumerate(as_completed(list(futures.values())), 1):
            try:
                outcome = future.result()
            except Exception as e:  # a worker died more often than Dask retries, or a dependency did
                outcome = Outcome(stage_of[future.key], "failed", detail=f"{type(e).__name__}: {e}")
            outcomes[future.key] = outcome
            print(report_line(i, len(stages), outcome), file=out, flush=True)
        return [outcomes[f.key] for f in futures.values()]
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
