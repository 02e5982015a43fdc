"""Running a grid's stages on Dask: a local cluster sized to the machine, or any existing one.

Each execution (one stage, or the trials of one condition) is one Dask task; the tasks of the
stages it reads are its dependencies, so Dask starts it as soon as its inputs exist and runs
independent ones side by side. A task never raises for a failing notebook
(:func:`nbutils.pipeline.runner.run_execution` turns it into a "failed" outcome, and the stages that
need it into "skipped" ones), so one failure does not stop independent work. Artifacts are
committed atomically by the store: interrupting a run loses only the stages in flight, and
running it again reuses everything already committed.

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

import dask
import distributed   # with dask, not lazily: it registers its config and logging, which run_on_dask sets

from ..core.malloc import MALLOC_ENV
from .execution import Outcome, default_workers, run_execution
from .progress import Progress

if TYPE_CHECKING:
    from .stages import Stage
    from ..core.store import ArtifactStore

log = logging.getLogger(__name__)

#: the environment of local workers: Dask's defaults with :data:`nbutils.core.malloc.MALLOC_ENV`
#: instead of ``MALLOC_TRIM_THRESHOLD_=65536``, which makes glibc return freed memory at once
#: and fixes its mmap threshold, so that every activation tensor of a supernet step is a fresh
#: mapping whose pages fault in again, and a search in a worker runs much slower than outside
#: Dask (the measurement: benchmarks/README.md)
WORKER_ENVIRON = {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1, **MALLOC_ENV}


def _run_execution(group, store, kernel, needs, threads, fresh_kernel=False, timeout=None):
    """The task of one execution: ``needs`` are the outcome lists of the executions it reads."""
    return run_execution(group, store, kernel, [o for outcomes in needs for o in outcomes], threads, fresh_kernel,
                         timeout)


def run_on_dask(stages: list["Stage"], store: "ArtifactStore", kernel: str | None, *, workers: int,
                progress: Progress, scheduler: str | None = None, fresh_kernel: bool = False,
                timeouts: list[float | None] | None = None, out=sys.stdout) -> list["Outcome"]:
    """Submit every execution as a task after the tasks it reads; report each stage's outcome
    to ``progress`` as it arrives; return the outcomes in stage order. ``timeouts``: each
    execution's (in ``progress.plan.groups`` order; None: no limit)."""
    for name in ("distributed", "tornado", "bokeh"):   # keep the run's output to the stages' progress
        logging.getLogger(name).setLevel(logging.WARNING)
    cluster = None
    if scheduler is None:
        threads = max(1, default_workers() // workers)
        with dask.config.set({"distributed.nanny.pre-spawn-environ": WORKER_ENVIRON}):
            cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=":0", silence_logs=logging.ERROR)
        client = distributed.Client(cluster)
    else:
        threads = None   # the remote workers' own settings
        client = distributed.Client(scheduler)
    print(f"Dask: {len(client.scheduler_info()['workers'])} workers"
          + (f" ({threads} thread{'s' if threads > 1 else ''} each)" if threads else f" at {scheduler}"),
          file=out, flush=True)
    try:
        groups, priority = progress.plan.groups, progress.plan.priority
        future_of: dict[int, object] = {}   # id(stage) -> the future of its execution
        futures = []
        for group, chain, timeout in zip(groups, priority, timeouts or [None] * len(groups)):
            needs = list({id(f): f for f in (future_of[id(i)] for s in group for i in s.inputs.values())}.values())
            future = client.submit(_run_execution, group, store, kernel, needs, threads, fresh_kernel, timeout,
                                   priority=chain,
                                   key=f"{group[0].kind}-{group[0].key}", pure=False)
            futures.append(future)
            future_of.update({id(s): future for s in group})
        group_of = {f.key: group for group, f in zip(groups, futures)}
        outcomes: dict[int, Outcome] = {}
        for future in distributed.as_completed(futures):
            try:
                finished = future.result()
            except Exception as e:  # a worker died more often than Dask retries, or a dependency did
                finished = [Outcome(s, "failed", detail=f"{type(e).__name__}: {e}") for s in group_of[future.key]]
            for stage, outcome in zip(group_of[future.key], finished):   # outcomes carry copies of the stages
                outcomes[id(stage)] = outcome
                progress.finished(stage, outcome)
        return [outcomes[id(s)] for s in stages]
    finally:
        if cluster is not None:   # our own workers: their shutdown is not the user's concern
            try:
                client.run(quiet_shutdown)
            except Exception:
                pass
            logging.getLogger("distributed.nanny").setLevel(logging.ERROR)
        client.close()
        if cluster is not None:
            cluster.close()


def quiet_shutdown() -> None:
    """In a local worker: stay silent while the cluster shuts down. A worker slow to exit on a
    busy machine otherwise logs its heartbeat's failure to reach the closed scheduler, with a
    traceback, after a run that went well."""
    for name in ("distributed", "tornado"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
