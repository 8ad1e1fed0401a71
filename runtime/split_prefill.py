"""Runs the split prefill plan (edge.plans) on lanes, out of order across chunks.

At load: one session per subgraph and lane that may run it (affinity; every lane when all lanes
are CPU-backed); each stage is timed on each lane, then the costs are refined by one chunk run
through every layer (the cost table ``schedule()`` needs). A prefill builds (and caches) the plan for
its chunk count; the lanes' worker threads then take tasks from one queue in planned start order:
each takes the first task it may run (affinity, or any task where all lanes are CPU-backed) whose
dependencies have ended, among the next ``lookahead`` of its tasks, so a lane does not idle behind a
task that is late because real costs differ from the estimates. Every task reads and
writes its chunk's registers; attention reads the layer's cache (rows at or after the chunk's
start masked) and writes the chunk's rows, so a result never depends on the order: the same
logits as the fused plan, bit for bit where onnxruntime picks the same kernels.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from edge.config import DecoderConfig
from edge.errors import BundleError
from edge.manifest import Manifest
from edge.plans import SplitPlan, Stage

from edge.runtime.bundle import Bundle, check_session_io
from edge.runtime.chunks import cut
from edge.runtime.kv_cache import KVCache
from edge.runtime.lanes import Lane
from edge.runtime.scheduler import CostTable, Schedule, StageInfo, Task, schedule
from edge.runtime.trace import Event, Trace

_NP = {"float32": np.float32, "int64": np.int64}


class SplitPrefill:
    def __init__(self, bundle: Bundle, lanes: dict[str, Lane], measure_runs: int = 3, lookahead: int = 4,
                 unfused_int8: bool = False):
        """``lanes``: from edge.runtime.lanes.make_lanes; ``measure_runs``: timings per stage at load;
        ``unfused_int8``: the CPU lanes run the static-int8 stages unfused (sessions.qdq_unfused)."""
        m: Manifest = bundle.manifest
        if m.plans.split is None:
            raise BundleError(f"{bundle.path}: the bundle has no split plan (re-export with --plans fused,split)")
        self.bundle, self.manifest, self.lanes, self.lookahead = bundle, m, lanes, max(1, lookahead)
        self.spec: SplitPlan = m.plans.split
        self.cfg: DecoderConfig = m.model
        self.C = self.spec.chunk_length
        self.stages = {s.name: s for s in self.spec.stages}
        self.flexible = all(lane.device.cpu_backed for lane in lanes.values())
        # attention reads as many cache rows as the fused graph does (bit-identical results): the
        # whole static cache, or, where the fused prefill takes a dynamic cache, the rows below start
        fused_past = next((t.shape[0] for t in m.graphs["prefill"].inputs if t.name == "past_key_0"), None)
        self.prefix_rows = isinstance(fused_past, str)
        # a CPU-backed lane can run any stage; otherwise affinity decides (a lone CPU lane is CPU-backed)
        self.can_run = {s.name: [ln for ln in lanes if self.flexible or ln == s.lane] for s in self.spec.stages}
        self.sessions: dict[tuple[str, str], object] = {}
        for s in self.spec.stages:
            for key in dict.fromkeys(s.graphs):
                spec = m.graphs[key]
                for ln in self.can_run[s.name]:
                    sess = lanes[ln].session(bundle.file(spec.file), unfused_int8)
                    check_session_io(sess, spec, str(bundle.file(spec.file)))
                    self.sessions[(key, ln)] = sess
        self.io = {key: ([i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
                   for (key, _), sess in self.sessions.items()}
        self.infos = [StageInfo(s.name, s.lane if s.lane in lanes else "cpu", s.scope == "layer", s.cross_chunk,
                                optional="@logits" in s.outputs.values()) for s in self.spec.stages]
        self._schedules: dict[tuple, Schedule] = {}
        self.last_trace: Trace | None = None
        self.costs = self.measure(measure_runs)
        for lane in lanes.values():  # start the worker threads now, not inside the first prefill
            lane.submit(lambda: None).result()
        self.costs = self.refine(self.costs)

    # ---------------------------------------------------------------- costs
    def _zero_feeds(self, stage: Stage, past: int) -> dict[str, np.ndarray]:
        spec = self.manifest.graphs[stage.graph(0)]
        feeds = {t.name: np.zeros([past if d == "past" else 1 if isinstance(d, str) else d for d in t.shape],
                                  _NP[t.dtype]) for t in spec.inputs}
        if "start" in feeds:
            feeds["start"][:] = min(past, self.manifest.max_context - self.C)
        return feeds

    def _time(self, stage: Stage, lane: str, runs: int, past: int) -> float:
        sess = self.sessions[(stage.graph(0), lane)]
        feeds = self._zero_feeds(stage, past)
        sess.run(None, feeds)  # warm-up
        best = float("inf")
        for _ in range(runs):
            t = time.perf_counter()
            sess.run(None, feeds)
            best = min(best, time.perf_counter() - t)
        return best

    def measure(self, runs: int = 3) -> CostTable:
        """Per-stage, per-lane seconds (best of ``runs``, layer 0's graph on zeros). Attention over
        cache prefixes is also timed at a long prefix: its growth per earlier chunk. Lanes that
        share sessions and CPU cores are timed once."""
        costs: dict[str, dict[str, float]] = {}
        growth: dict[str, dict[str, float]] = {}
        L, far = self.manifest.max_context, (self.manifest.max_context - self.C) // self.C
        for s in self.spec.stages:
            costs[s.name], timed = {}, {}
            for ln in self.can_run[s.name]:
                key = self.lanes[ln].key
                if key not in timed:
                    prefix = self.prefix_rows and "@past_key" in s.inputs.values()
                    base = self._time(s, ln, runs, 0 if prefix else L)
                    slope = max(0.0, self._time(s, ln, runs, far * self.C) - base) / far if prefix and far else 0.0
                    timed[key] = (base, slope)
                costs[s.name][ln], slope = timed[key]
                if slope:
                    growth.setdefault(s.name, {})[ln] = slope
        return CostTable(costs, growth)

    def refine(self, costs: CostTable) -> CostTable:
        """Costs as a real prefill sees them: one chunk of zeros through every layer, task after
        task (weights streamed from memory, not cached as in ``measure``); per stage, the median
        over layers replaces the estimate of the lanes that share the timed lane's sessions."""
        scratch = KVCache(self.cfg, self.manifest.max_context)
        self.prefill(np.zeros((1, self.C, self.cfg.hidden_size), np.float32), scratch, sequential=True)
        seen: dict[tuple[str, tuple], list[float]] = {}
        for e in self.last_trace.events:  # type: ignore[union-attr]
            seen.setdefault((e.stage, self.lanes[e.lane].key), []).append(e.end - e.start)
        self._schedules.clear()
        self.last_trace = None
        refined = {stage: {ln: float(np.median(seen.get((stage, self.lanes[ln].key), [c]))) for ln, c in by_lane.items()}
                   for stage, by_lane in costs.costs.items()}
        return CostTable(refined, costs.growth)

    # ---------------------------------------------------------------- plan
    def schedule_for(self, n_chunks: int, chunk_offset: int = 0, all_logits: bool = False) -> Schedule:
        opt = tuple(range(n_chunks)) if all_logits else (n_chunks - 1,)
        key = (n_chunks, chunk_offset, opt)
        if key not in self._schedules:
            self._schedules[key] = schedule(self.costs, n_chunks, self.infos, self.cfg.num_layers, tuple(self.lanes),
                                    optional_chunks=opt, chunk_offset=chunk_offset)
        return self._schedules[key]

    # ---------------------------------------------------------------- run
    def prefill(self, embeds: np.ndarray, cache: KVCache, all_logits: bool = False,
                sequential: bool = False) -> np.ndarray:
        """Same contract as Model.prefill (logits [n, V] or [V]); ``sequential`` runs the same
        tasks one after another on the calling thread (for comparison)."""
        n, C = embeds.shape[1], self.C
        start = cache.length
        n_chunks = -(-n // C)
        p = self.schedule_for(n_chunks, start // C, all_logits)
        run = _Run(self, embeds, cache, start, all_logits)
        t0 = time.perf_counter()
        if sequential:
            for t in p.tasks:
                run.task(t, p.lane_of[t], t0)
        else:
            run.pending = p.tasks  # one queue in planned start order
            run.left = {ln: sum(ln in self.can_run[t.stage] for t in run.pending) for ln in self.lanes}
            futures = [self.lanes[ln].submit(run.lane_loop, ln, p.deps, t0, self.lookahead)
                       for ln, tasks in p.order.items() if tasks or self.flexible]
            for f in futures:
                f.result()
        cache.length = max(cache.length, start + n)
        self.last_trace = Trace(run.events, tuple(self.lanes),
                                {"tokens": n, "chunks": n_chunks, "sequential": sequential,
                                 "lanes": {k: f"{v.device.provider} x{v.threads}" for k, v in self.lanes.items()}})
        logits = [run.logits[c] for c in sorted(run.logits)]
        return np.concatenate(logits, 0) if all_logits else logits[-1][-1]


class _Run:
    """The state of one prefill: per-chunk registers, results, trace events."""

    def __init__(self, owner: SplitPrefill, embeds: np.ndarray, cache: KVCache, start: int, all_logits: bool):
        self.o, self.cache, self.start, self.all_logits = owner, cache, start, all_logits
        self.n, C = embeds.shape[1], owner.C
        self.chunks = [(c.embeds, c.pos, c.count) for c in cut(embeds, C, start)]
        self.regs: list[dict[str, np.ndarray]] = [{} for _ in self.chunks]
        self.logits: dict[int, np.ndarray] = {}
        self.events: list[Event] = []
        self.done: set[Task] = set()
        self.pending: list[Task] = []
        self.left: dict[str, int] = {}  # per lane: queued tasks it may run
        self.changed = threading.Condition()  # notified whenever a task ends (or one fails)
        self.failed = False

    def _value(self, reg: str, c: int, layer: int) -> np.ndarray:
        embeds, pos, count = self.chunks[c]
        if reg == "@embeds":
            return embeds
        if reg == "@start":
            return np.array([pos], np.int64)
        # as many rows as the fused graph reads: an ulp of difference before a QuantizeLinear can flip
        # an int8 step, and the tokens would then differ
        rows = pos if self.o.prefix_rows else self.cache.capacity
        if reg == "@past_key":
            return self.cache.keys[layer, :rows]
        if reg == "@past_value":
            return self.cache.values[layer, :rows]
        return self.regs[c][reg]

    def task(self, t: Task, lane: str, t0: float) -> None:
        stage = self.o.stages[t.stage]
        key = stage.graph(max(t.layer, 0))
        ins, outs = self.o.io[key]
        feeds = {name: self._value(stage.inputs[name], t.chunk, t.layer) for name in ins}
        _, pos, count = self.chunks[t.chunk]
        if "@logits" in stage.outputs.values():  # the head: only the rows asked for
            feeds = {k: (v[:count] if self.all_logits else v[count - 1:count]) for k, v in feeds.items()}
        begin = time.perf_counter()
        results = self.o.sessions[(key, lane)].run(outs, feeds)
        end = time.perf_counter()
        for name, value in zip(outs, results):
            reg = stage.outputs[name]
            if reg == "@key":
                self.cache.keys[t.layer, pos:pos + count] = value[:count]
            elif reg == "@value":
                self.cache.values[t.layer, pos:pos + count] = value[:count]
            elif reg == "@logits":
                self.logits[t.chunk] = value[0]
            else:
                self.regs[t.chunk][reg] = value
        self.events.append(Event(str(t), t.stage, t.chunk, t.layer, lane, begin - t0, end - t0))

    def _next(self, lane: str, deps: dict, lookahead: int) -> Task | None:
        """The first task this lane may run whose dependencies have ended, among the first
        ``lookahead`` such tasks of the queue (planned start order)."""
        mine = 0
        for t in self.pending:
            if lane in self.o.can_run[t.stage]:
                if all(d in self.done for d in deps[t]):
                    return t
                mine += 1
                if mine == lookahead:
                    break
        return None

    def lane_loop(self, lane: str, deps: dict, t0: float, lookahead: int) -> None:
        """Take tasks from the shared queue until it is empty: real costs differ from the measured
        ones, so a lane does not wait for a task that is not ready while a later one is."""
        try:
            while True:
                with self.changed:
                    while True:
                        if self.failed or not self.left[lane]:
                            return
                        pick = self._next(lane, deps, lookahead)
                        if pick is not None:
                            break
                        self.changed.wait()
                    self.pending.remove(pick)
                    for ln in self.o.can_run[pick.stage]:
                        self.left[ln] -= 1
                self.task(pick, lane, t0)
                with self.changed:
                    self.done.add(pick)
                    self.changed.notify_all()
        except BaseException:
            with self.changed:
                self.failed = True
                self.changed.notify_all()
            raise
