"""Out-of-order scheduling of a split prefill over lanes: a pure ``schedule()`` and its task graph.

Tasks are (chunk, layer, stage). Dependencies: a chunk's tasks run in chain order (its stages in
plan order, the per-layer stages once per layer); a ``cross_chunk`` stage (attention) also waits for
the previous chunk's task of the same stage and layer, whose K/V cache rows it reads.

``schedule()`` simulates list scheduling with per-stage costs (measured at load time) and returns each
lane's task order. The rule is llm.npu's greedy one: when a lane frees up it takes, among the ready
tasks it can run, the one that unblocks the most work for the *other* lanes, then the one with the
longest path to the end (critical path), then the earliest chunk. A task that another lane would
finish sooner (earliest-finish-time test) is left to that lane: with fixed affinity (a real NPU)
only affinity decides; where a lane can run anything (a CPU-backed accelerator lane) this moves
work between lanes to balance them. Pure and deterministic: same inputs, same plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

EPS = 1e-12


@dataclass(frozen=True)
class StageInfo:
    name: str
    lane: str                 # affinity
    per_layer: bool
    cross_chunk: bool = False
    optional: bool = False    # runs only on the chunks asked for (the head: last chunk, or all for perplexity)


@dataclass(frozen=True, order=True)
class Task:
    chunk: int
    step: int                 # position in the chunk's chain
    stage: str
    layer: int                # -1: a once-per-chunk stage

    def __str__(self) -> str:
        return f"c{self.chunk}.{self.stage}" + (f".{self.layer}" if self.layer >= 0 else "")


@dataclass(frozen=True)
class CostTable:
    """Seconds per task: ``costs[stage][lane]`` (a lane missing = cannot run it) plus
    ``growth[stage][lane]`` per earlier chunk (attention reads a longer cache)."""

    costs: Mapping[str, Mapping[str, float]]
    growth: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def lanes(self, stage: str) -> list[str]:
        return list(self.costs[stage])

    def cost(self, task: Task, lane: str, chunk_offset: int = 0) -> float:
        g = self.growth.get(task.stage, {}).get(lane, 0.0)
        return self.costs[task.stage][lane] + g * (task.chunk + chunk_offset)


def build_tasks(stages: Sequence[StageInfo], num_layers: int, n_chunks: int,
                optional_chunks: Iterable[int] | None = None) -> tuple[list[Task], dict[Task, tuple[Task, ...]]]:
    """All tasks in a topological order, and each task's dependencies."""
    if n_chunks < 1:
        raise ValueError(f"n_chunks must be >= 1, got {n_chunks}")
    opt = {n_chunks - 1} if optional_chunks is None else set(optional_chunks)
    tasks: list[Task] = []
    deps: dict[Task, tuple[Task, ...]] = {}
    i = 0
    blocks: list[list[StageInfo]] = []  # runs of chunk stages / layer stages, in order
    while i < len(stages):
        j = i
        while j < len(stages) and stages[j].per_layer == stages[i].per_layer:
            j += 1
        blocks.append(list(stages[i:j]))
        i = j
    previous: dict[tuple[str, int], Task] = {}  # (stage, layer) -> that task of the previous chunk
    for c in range(n_chunks):
        prev: Task | None = None
        step = 0
        for block in blocks:
            for layer in (range(num_layers) if block[0].per_layer else [-1]):
                for s in block:
                    if s.optional and c not in opt:
                        continue
                    t = Task(c, step, s.name, layer)
                    d = [prev] if prev else []
                    if s.cross_chunk and (s.name, layer) in previous:
                        d.append(previous[(s.name, layer)])
                    deps[t] = tuple(d)
                    tasks.append(t)
                    if s.cross_chunk:
                        previous[(s.name, layer)] = t
                    prev, step = t, step + 1
    return tasks, deps


@dataclass
class Schedule:
    order: dict[str, list[Task]]            # lane -> its tasks, in the order it runs them
    lane_of: dict[Task, str]
    start: dict[Task, float]                # simulated (seconds)
    end: dict[Task, float]
    deps: dict[Task, tuple[Task, ...]]

    @property
    def makespan(self) -> float:
        return max(self.end.values(), default=0.0)

    def busy(self) -> dict[str, float]:
        return {lane: sum(self.end[t] - self.start[t] for t in ts) for lane, ts in self.order.items()}

    @property
    def tasks(self) -> list[Task]:
        """Every task in simulated start order (a valid sequential order too)."""
        return sorted(self.lane_of, key=lambda t: (self.start[t], t))


def schedule(costs: CostTable, n_chunks: int, stages: Sequence[StageInfo], num_layers: int,
         lanes: Sequence[str] = ("cpu", "accel"), optional_chunks: Iterable[int] | None = None,
         chunk_offset: int = 0) -> Schedule:
    """Assign every task to a lane and order each lane's tasks (see the module docstring)."""
    tasks, deps = build_tasks(stages, num_layers, n_chunks, optional_chunks)
    runnable = {s.name: [ln for ln in lanes if ln in costs.costs.get(s.name, {})] for s in stages}
    for s in stages:
        if not runnable[s.name]:
            raise ValueError(f"stage {s.name!r} has a cost on none of the lanes {list(lanes)}")
    # integer ids inside: hashing frozen dataclasses would dominate the run time
    index = {t: i for i, t in enumerate(tasks)}
    n = len(tasks)
    dep = [[index[d] for d in deps[t]] for t in tasks]
    succ: list[list[int]] = [[] for _ in range(n)]
    for i, ds in enumerate(dep):
        for d in ds:
            succ[d].append(i)
    affinity = {s.name: s.lane for s in stages}
    aff = [affinity[t.stage] for t in tasks]
    cost = [{ln: costs.cost(t, ln, chunk_offset) for ln in runnable[t.stage]} for t in tasks]
    cheapest = [min(c.values()) for c in cost]
    bottom = [0.0] * n
    for i in range(n - 1, -1, -1):  # tasks come in a topological order
        bottom[i] = cheapest[i] + max((bottom[j] for j in succ[i]), default=0.0)
    tie = [(-t.chunk, -t.step) for t in tasks]

    waiting = [len(d) for d in dep]
    frontier = [i for i in range(n) if not dep[i]]   # every dependency scheduled
    ready = [0.0] * n
    free = {ln: 0.0 for ln in lanes}
    start, end = [0.0] * n, [0.0] * n
    lane_of: list[str] = [""] * n
    order: dict[str, list[int]] = {ln: [] for ln in lanes}

    def priority(i: int, lane: str) -> tuple:
        unblocks = sum(cheapest[j] for j in succ[i] if waiting[j] == 1 and aff[j] != lane)
        return (unblocks, bottom[i], *tie[i])

    while frontier:
        best: tuple[float, str] | None = None  # the lane that can start something soonest (ties: lane order)
        for ln in lanes:
            avail = [ready[i] for i in frontier if ln in cost[i]]
            if avail:
                at = max(free[ln], min(avail))
                if best is None or at < best[0] - EPS:
                    best = (at, ln)
        assert best is not None, "a frontier task no lane can run"
        now, lane = best
        cands = [i for i in frontier if lane in cost[i] and ready[i] <= now + EPS]
        # earliest-finish test: leave a task to a lane that would finish it sooner
        mine = [i for i in cands if not any(
            o != lane and max(free[o], ready[i]) + c < now + cost[i][lane] - EPS for o, c in cost[i].items())]
        if not mine:
            later = [x for x in [*free.values(), *(ready[i] for i in frontier)] if x > now + EPS]
            if later:  # idle until another lane finishes or a task becomes ready
                free[lane] = min(later)
                continue
            mine = cands
        i = max(mine, key=lambda i: priority(i, lane))
        start[i], end[i] = now, now + cost[i][lane]
        free[lane] = end[i]
        lane_of[i] = lane
        order[lane].append(i)
        frontier.remove(i)
        for j in succ[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                frontier.append(j)
                ready[j] = max(end[d] for d in dep[j])
    return Schedule({ln: [tasks[i] for i in ids] for ln, ids in order.items()},
                {tasks[i]: lane_of[i] for i in range(n)}, {tasks[i]: start[i] for i in range(n)},
                {tasks[i]: end[i] for i in range(n)}, deps)


def check_schedule(p: Schedule) -> None:
    """Raise AssertionError if a task starts before a dependency ends or two tasks of a lane overlap."""
    for t, ds in p.deps.items():
        assert t in p.lane_of, f"{t} was not scheduled"
        for d in ds:
            assert p.end[d] <= p.start[t] + EPS, f"{t} starts at {p.start[t]} before {d} ends at {p.end[d]}"
    for lane, ts in p.order.items():
        for a, b in zip(ts, ts[1:]):
            assert p.end[a] <= p.start[b] + EPS, f"lane {lane}: {a} and {b} overlap"
