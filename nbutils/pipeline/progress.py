"""What a run will cost and how far it is: the plan printed by ``--dry-run`` and before a run,
and the line printed as each stage finishes, with stages done / total and the time left.

Both come from :mod:`~nbutils.pipeline.cost_model`: each execution's seconds are the sum of
its stages' estimates (zero for a stage the store already holds), and the wall time is that
of a list schedule of the executions on the workers, each after the executions it reads and
the longest chains first, as Dask runs them (:func:`nbutils.pipeline.cluster.chain_lengths`).
As stages finish, their seconds become measurements of their class, so the time left follows
the machine the run is on. An execution whose inputs are all done counts as running since
then, up to one per worker, and only its remaining estimate counts.
"""
from __future__ import annotations

import heapq
import sys
import time
from collections import Counter
from typing import Callable, Sequence

from .cost_model import CostModel, Estimate, format_duration, recorded_seconds
from .execution import Outcome, executions, report_line
from .stages import Stage


def chain_lengths(groups: Sequence[Sequence[Stage]]) -> list[int]:
    """For each execution, the number of executions on the longest chain that starts with it
    (itself, then what reads it, ...): the priority Dask gives it, so that the long chains
    (clean trials -> gradient canceling -> poisoned trials -> report) start early."""
    where = {id(s): i for i, group in enumerate(groups) for s in group}
    readers: list[set[int]] = [set() for _ in groups]
    for i, group in enumerate(groups):
        for s in group:
            for source in s.inputs.values():
                if id(source) in where and where[id(source)] != i:
                    readers[where[id(source)]].add(i)
    length = [1] * len(groups)
    for i in reversed(range(len(groups))):   # groups are in dependency order: readers come later
        length[i] = 1 + max((length[j] for j in readers[i]), default=0)
    return length


def makespan(durations: Sequence[float], needs: Sequence[set[int]], workers: int, priority: Sequence[int],
             done: set[int] = frozenset(), running: dict[int, float] | None = None) -> float:
    """Wall seconds for ``workers`` to run every execution not in ``done``, each after the
    executions it ``needs``, the highest ``priority`` first among those ready; ``running``:
    executions already under way -> their seconds left."""
    running = dict(running or {})
    pending = {i for i in range(len(durations)) if i not in done and i not in running}
    finished = set(done)
    events = [(left, i) for i, left in running.items()]   # (finish time, execution)
    heapq.heapify(events)
    free = max(1, workers) - len(events)
    now = 0.0
    ready = [(-priority[i], i) for i in pending if needs[i] <= finished]
    heapq.heapify(ready)
    queued = {i for _, i in ready}
    while ready or events:
        while free > 0 and ready:
            _, i = heapq.heappop(ready)
            heapq.heappush(events, (now + durations[i], i))
            free -= 1
        now, i = heapq.heappop(events)
        free += 1
        finished.add(i)
        for j in pending:
            if j not in queued and needs[j] <= finished:
                heapq.heappush(ready, (-priority[j], j))
                queued.add(j)
    return now


class Plan:
    """The executions of a run with their estimated seconds (see the module docstring)."""

    def __init__(self, stages: list[Stage], store, model: CostModel, workers: int, batched: bool = True):
        self.stages = stages
        self.model = model
        self.workers = max(1, workers)
        self.groups = executions(stages, batched)
        where = {id(s): i for i, group in enumerate(self.groups) for s in group}
        self.needs = [{where[id(inp)] for s in group for inp in s.inputs.values()
                       if id(inp) in where and where[id(inp)] != i} for i, group in enumerate(self.groups)]
        self.priority = chain_lengths(self.groups)
        self.to_run = {id(s) for s in stages if s.rerun or not store.exists(s.kind, s.key)}
        self.recorded = {id(s): recorded_seconds(store.root, s.kind, s.key) for s in stages
                         if id(s) not in self.to_run}

    def estimate(self, stage: Stage) -> Estimate:
        """This stage's seconds: its own when recorded, else its class's (measured or modelled)."""
        if self.recorded.get(id(stage)) is not None:
            return Estimate(self.recorded[id(stage)], "recorded")
        return self.model.estimate(stage.kind, stage.spec, len(stage.inputs))

    def durations(self, whole: bool = False) -> list[float]:
        """Each execution's seconds: of the stages still to run (``whole``: of all of them)."""
        return [sum(self.estimate(s).seconds for s in group if whole or id(s) in self.to_run) for group in self.groups]

    def wall_seconds(self, whole: bool = False) -> float:
        return makespan(self.durations(whole), self.needs, self.workers, self.priority)

    def summary_lines(self) -> list[str]:
        """Per kind: stages, stages to run, estimated CPU hours and their basis; then the totals."""
        lines = [f"{'kind':<12}{'stages':>7}{'to run':>8}{'CPU h (all)':>13}{'CPU h (to run)':>16}  estimate from"]
        kinds = list(dict.fromkeys(s.kind for s in self.stages))
        total = {"all": 0.0, "run": 0.0}
        bases = Counter()
        for kind in kinds:
            members = [s for s in self.stages if s.kind == kind]
            estimates = [(s, self.estimate(s)) for s in members]
            everything = sum(e.seconds for _, e in estimates)
            to_run = sum(e.seconds for s, e in estimates if id(s) in self.to_run)
            basis = Counter(e.basis for _, e in estimates)
            bases.update(basis)
            total["all"] += everything
            total["run"] += to_run
            lines.append(f"{kind:<12}{len(members):>7}{sum(id(s) in self.to_run for s in members):>8}"
                         f"{everything / 3600:>13.3f}{to_run / 3600:>16.3f}  "
                         + ", ".join(f"{n} {b}" for b, n in sorted(basis.items())))
        lines.append(f"{'total':<12}{len(self.stages):>7}{len(self.to_run):>8}{total['all'] / 3600:>13.3f}"
                     f"{total['run'] / 3600:>16.3f}")
        lines.append(f"Wall time on {self.workers} worker{'s' if self.workers > 1 else ''}: "
                     f"about {format_duration(self.wall_seconds())} for the stages to run "
                     f"({self.wall_seconds() / 3600:.2f} h), {format_duration(self.wall_seconds(whole=True))} "
                     f"for the whole run from scratch.")
        lines.append("Estimates: recorded = the stage's own seconds in the store; measured = its class's seconds "
                     "per unit in the store; modelled = the cost model's table (nbutils/pipeline/cost_model.py), "
                     f"scaled by this machine's measured speed (x{self.model.speed_factor():.2f}).")
        return lines


class Progress:
    """Prints one line per finished stage: ``[done/total] label: status`` and the time left."""

    def __init__(self, plan: Plan, out=sys.stdout, clock: Callable[[], float] = time.monotonic):
        self.plan = plan
        self.out = out
        self.clock = clock
        self.done = 0
        self.started = clock()
        self._finished_stages: set[int] = set()
        self._finished_groups: set[int] = set()
        self._ready_since: dict[int, float] = {}
        self._group_of = {id(s): i for i, group in enumerate(plan.groups) for s in group}
        self._note_ready()

    def header(self) -> str:
        plan = self.plan
        basis = Counter(plan.estimate(s).basis for s in plan.stages if id(s) in plan.to_run)
        return (f"{len(plan.stages)} stages, {len(plan.to_run)} to run: about {format_duration(plan.wall_seconds())} "
                f"on {plan.workers} worker{'s' if plan.workers > 1 else ''}"
                + (" (estimated from " + ", ".join(f"{n} {b}" for b, n in sorted(basis.items())) + ")" if basis else ""))

    def finished(self, stage: Stage, outcome: Outcome) -> str:
        """Count a finished stage of the plan (its seconds measure its class when it ran); print
        and return its line."""
        key = id(stage)
        if key not in self._finished_stages:
            self._finished_stages.add(key)
            self.done += 1
            if outcome.status == "ran":
                self.plan.model.observe(stage.kind, stage.spec, outcome.seconds, len(stage.inputs))
            group = self._group_of.get(key)
            if group is not None and all(id(s) in self._finished_stages for s in self.plan.groups[group]):
                self._finished_groups.add(group)
                self._note_ready()
        line = report_line(self.done, len(self.plan.stages), outcome)
        if self.done < len(self.plan.stages):
            line += f"  [about {format_duration(self.time_left())} left]"
        print(line, file=self.out, flush=True)
        return line

    def time_left(self) -> float:
        plan = self.plan
        durations = plan.durations()
        now = self.clock()
        under_way = sorted((since, i) for i, since in self._ready_since.items() if i not in self._finished_groups)
        running = {i: max(0.0, durations[i] - (now - since)) for since, i in under_way[:plan.workers]}
        return makespan(durations, plan.needs, plan.workers, plan.priority, self._finished_groups, running)

    def _note_ready(self) -> None:
        now = self.clock()
        for i, needs in enumerate(self.plan.needs):
            if i not in self._ready_since and i not in self._finished_groups and needs <= self._finished_groups:
                self._ready_since[i] = now
