"""Where one prefill chunk's (or decode step's) time goes, per operator type, bundles side by side.

    python -m edge.bench.op_profile BUNDLE [BUNDLE ...] [--plan fused|cpu] [--step chunk|decode]
        [--past 256] [--repeat 8] [--threads 2] [--top 16]

Each bundle's graph (fused: the prefill chunk graph; cpu: the CPU plan's one graph) runs one chunk of
the default text (or one decode step) at position --past, after the tokens before it were
prefilled for real (so the KV cache holds real keys and values), under onnxruntime's profiler. Kernel time is summed per operator type and divided by the runs: what an
int8 linear buys is bounded by the share of the float graph that is linear (Amdahl), and this is
the table that shows it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


import numpy as np
import onnxruntime as ort

from edge.runtime.model import Model
from edge.runtime.sessions import session_options
from edge.runtime.perplexity import default_text


@dataclass(frozen=True)
class OpProfile:
    bundle: str
    ms_per_op: dict[str, float]  # kernel ms per chunk, by operator type
    nodes_per_op: dict[str, int]

    @property
    def total_ms(self) -> float:
        return sum(self.ms_per_op.values())


def chunk_feeds(model: Model, past: int) -> dict[str, np.ndarray]:
    """Feeds of the chunk that starts at ``past``: real text, cache prefilled with real tokens."""
    C = model.chunk_length
    if past + C > model.max_context:
        raise SystemExit(f"--past {past} + chunk {C} exceeds the bundle's context {model.max_context}")
    ids = model.tokenizer.encode(default_text())[: past + C]
    cache = model.new_cache()
    if past:
        model.prefill(model.embed(ids[:past]), cache)
    return model.chunks.feeds(model.embed(ids[past:]), past, cache, [C - 1])


def profile_chunk(bundle: Path, past: int, repeat: int, threads: int) -> OpProfile:
    model = Model.load(bundle, threads=threads, plan="fused")
    feeds = chunk_feeds(model, past)
    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "prefill")
        graph = model.bundle.file(model.bundle.manifest.graphs["prefill"].file)
        sess = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
        for _ in range(repeat + 1):
            sess.run(None, feeds)
        total, count = kernel_times(sess.end_profiling(), skip_runs=1)  # the first run allocates and prepacks
    return OpProfile(str(bundle), {op: us / repeat / 1e3 for op, us in total.items()},
                     {op: round(n / repeat) for op, n in count.items()})


def profile_cpu(bundle: Path, past: int, repeat: int, threads: int, step: str, chunk: int = 128) -> OpProfile:
    """The CPU plan's graph: ``step`` "chunk" (``chunk`` tokens) or "decode" (one token) at ``past``,
    the cache rolled back to ``past`` before each run (so every run does the same work)."""
    from edge.runtime.cpu_plan import CpuPlan

    model = Model.load(bundle, threads=threads, plan="cpu")
    n = chunk if step == "chunk" else 1
    if past + n > model.max_context:
        raise SystemExit(f"--past {past} + {n} tokens exceeds the bundle's context {model.max_context}")
    ids = model.tokenizer.encode(default_text())[: past + n]
    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "cpu")
        graph = model.bundle.file(model.bundle.manifest.graphs[model.bundle.manifest.plans.cpu.graph].file)
        plan = CpuPlan(ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"]), model.config,
                       model.max_context, model.cpu.chunk, model.bundle.manifest.plans.cpu.kv)
        cache = plan.new_cache()
        calls = -(-past // plan.chunk) if past else 0
        if past:
            plan.prefill(model.embed(ids[:past]), cache)
        x = model.embed(ids[past:])
        for _ in range(repeat + 1):
            cache.length = past
            plan.run(x, cache, np.array([n - 1], np.int64))
        total, count = kernel_times(plan.session.end_profiling(), skip_runs=calls + 1)
    return OpProfile(str(bundle), {op: us / repeat / 1e3 for op, us in total.items()},
                     {op: round(k / repeat) for op, k in count.items()})


def kernel_times(profile_file: str, skip_runs: int) -> tuple[Counter, Counter]:
    """Kernel microseconds and node counts per operator type, after the first ``skip_runs`` runs."""
    with open(profile_file) as f:
        events = json.load(f)
    runs = sorted(e["ts"] + e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    after = runs[skip_runs - 1] if skip_runs else -1
    total, count = Counter(), Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] > after:
            op = e["args"].get("op_name", "?")
            total[op] += e["dur"]
            count[op] += 1
    return total, count


def table(profiles: list[OpProfile], top: int) -> str:
    ops = Counter()
    for p in profiles:
        ops.update(p.ms_per_op)
    rows = [op for op, _ in ops.most_common(top)]
    names = [Path(p.bundle).name for p in profiles]
    width = max(12, *(len(n) for n in names))
    lines = [f"{'op (ms per run, share)':28s}" + "".join(f"{n:>{width + 8}s}" for n in names)]
    for op in rows:
        cells = "".join(f"{p.ms_per_op.get(op, 0.0):>{width}.2f} ({100 * p.ms_per_op.get(op, 0.0) / p.total_ms:4.1f}%)"
                        for p in profiles)
        lines.append(f"{op:28s}{cells}")
    lines.append(f"{'kernel total':28s}" + "".join(f"{p.total_ms:>{width}.2f}        " for p in profiles))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", type=Path, nargs="+")
    p.add_argument("--plan", choices=("fused", "cpu"), default="fused", help="the graph profiled (default fused)")
    p.add_argument("--step", choices=("chunk", "decode"), default="chunk",
                   help="cpu plan: a 128-token chunk or one decode step (default chunk)")
    p.add_argument("--past", type=int, default=256, help="cached positions before the chunk (default 256)")
    p.add_argument("--repeat", type=int, default=8, help="profiled runs after a warm-up (default 8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=16, help="operator types shown (default 16)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.past < 0:
        p.error(f"--repeat must be >= 1 and --past >= 0 (got {args.repeat}, {args.past})")
    if args.plan == "cpu":
        profiles = [profile_cpu(b, args.past, args.repeat, args.threads, args.step) for b in args.bundles]
    else:
        profiles = [profile_chunk(b, args.past, args.repeat, args.threads) for b in args.bundles]
    if args.json:
        print(json.dumps([{"bundle": q.bundle, "total_ms": q.total_ms, "ms_per_op": q.ms_per_op,
                           "nodes_per_op": q.nodes_per_op} for q in profiles]))
    else:
        print(table(profiles, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
