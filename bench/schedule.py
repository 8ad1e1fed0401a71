"""Split-plan prefill benchmark: out-of-order schedule vs the same tasks in sequence vs the fused plan.

    python -m edge.bench.schedule BUNDLE [--tokens 512] [--repeats 5] [--trace t.json] [--gantt g.png]

Lanes: ``cpu`` + a second-CPU ``accel`` lane (--accelerator cpu), one onnxruntime thread each;
the fused plan runs on 2 threads. The prompt is real text (Python's pydoc topics), cut to --tokens.
BUNDLE must hold the split plan (edge-export ... --plans fused,split, the default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np


from edge.runtime import Model
from edge.runtime.perplexity import default_text


def prompt_ids(model: Model, n: int) -> list[int]:
    ids = model.tokenizer.encode(default_text()[: n * 8])
    if len(ids) < n:
        raise SystemExit(f"text gave only {len(ids)} tokens")
    return ids[:n]


def timed(fn, repeats: int) -> tuple[list[float], object]:
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--accelerator", default="cpu", help="accelerator lane (default: a second CPU lane)")
    p.add_argument("--fused-threads", type=int, default=2)
    p.add_argument("--trace", help="write the out-of-order run's Chrome trace JSON here")
    p.add_argument("--gantt", help="write a Gantt chart PNG here (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)

    fused = Model.load(args.bundle, threads=args.fused_threads, verify_hashes=False)
    t = time.perf_counter()
    split = Model.load(args.bundle, plan="split", accelerator=args.accelerator, lane_threads=1, verify_hashes=False)
    load_s = time.perf_counter() - t
    sp = split.split_prefill
    ids = prompt_ids(fused, args.tokens)
    embeds = fused.embed(ids)

    def run_fused():
        return fused.prefill(embeds, fused.new_cache())

    def run_split(sequential: bool):
        logits = sp.prefill(embeds, split.new_cache(), sequential=sequential)
        return logits, sp.last_trace

    for fn in (run_fused, lambda: run_split(False), lambda: run_split(True)):  # warm-up
        fn()
    rounds = {"fused": [], "ooo": [], "seq": []}
    traces, outs = [], {}
    for _ in range(args.repeats):  # interleaved, so drifts hit all three alike
        tf, outs["fused"] = timed(run_fused, 1)
        to, (outs["ooo"], tr) = timed(lambda: run_split(False), 1)
        ts, (outs["seq"], _) = timed(lambda: run_split(True), 1)
        rounds["fused"] += tf
        rounds["ooo"] += to
        rounds["seq"] += ts
        traces.append((to[0], tr))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    best = {k: min(v) for k, v in rounds.items()}  # least disturbed by other processes
    trace = sorted(traces, key=lambda x: x[0])[len(traces) // 2][1]  # the median run's trace
    stats = trace.stats()
    plan = sp.schedule_for(-(-len(ids) // sp.C))
    same = {k: int(np.argmax(outs[k])) == int(np.argmax(outs["fused"])) for k in ("ooo", "seq")}
    maxdiff = float(np.abs(outs["ooo"] - outs["fused"]).max())
    result = {
        "tokens": len(ids), "chunk": sp.C, "context": fused.max_context, "layers": fused.config.num_layers,
        "lanes": {k: f"{v.device.name} x{v.threads}" for k, v in sp.lanes.items()},
        "split_load_s": load_s, "tasks": stats["tasks"],
        "wall_ms": {k: v * 1e3 for k, v in med.items()},
        "best_wall_ms": {k: v * 1e3 for k, v in best.items()},
        "best_ratio_seq_over_ooo": best["seq"] / best["ooo"], "best_ratio_fused_over_ooo": best["fused"] / best["ooo"],
        "loadavg_1min": os.getloadavg()[0],
        "tok_per_s": {k: len(ids) / v for k, v in med.items()},
        "ratio_seq_over_ooo": med["seq"] / med["ooo"], "ratio_fused_over_ooo": med["fused"] / med["ooo"],
        "busy_ms": {k: v * 1e3 for k, v in stats["busy_s"].items()},
        "bubble_fraction": stats["bubble_fraction"],
        "trace_wall_ms": stats["wall_s"] * 1e3,
        "plan_makespan_ms": plan.makespan * 1e3, "plan_busy_ms": {k: v * 1e3 for k, v in plan.busy().items()},
        "same_next_token_as_fused": same, "max_logit_diff_vs_fused": maxdiff,
        "costs_us": {s: {ln: round(c * 1e6) for ln, c in d.items()} for s, d in sp.costs.costs.items()},
    }
    if args.trace:
        trace.save(args.trace)
    if args.gantt:
        trace.gantt(args.gantt, title=f"{len(ids)}-token prefill, split plan, 2 CPU lanes: " + trace.summary())
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    w = result["wall_ms"]
    print(f"{len(ids)}-token prefill, chunk {sp.C}, context {fused.max_context}, {result['tasks']} tasks, "
          f"lanes {result['lanes']}, fused on {args.fused_threads} threads; median of {args.repeats}")
    print(f"  out-of-order schedule : {w['ooo']:8.1f} ms  ({result['tok_per_s']['ooo']:.0f} tok/s)")
    print(f"  same tasks in sequence: {w['seq']:8.1f} ms  ({result['tok_per_s']['seq']:.0f} tok/s)  "
          f"x{result['ratio_seq_over_ooo']:.2f} of out-of-order")
    print(f"  fused plan            : {w['fused']:8.1f} ms  ({result['tok_per_s']['fused']:.0f} tok/s)  "
          f"x{result['ratio_fused_over_ooo']:.2f} of out-of-order")
    b = result["best_wall_ms"]
    print(f"  best of {args.repeats}: out-of-order {b['ooo']:.1f} ms, sequence {b['seq']:.1f} ms "
          f"(x{result['best_ratio_seq_over_ooo']:.2f}), fused {b['fused']:.1f} ms (x{result['best_ratio_fused_over_ooo']:.2f})")
    print(f"  trace: {trace.summary()}  [1-min load average {result['loadavg_1min']:.2f}]")
    print(f"  plan (simulated from load-time costs): makespan {result['plan_makespan_ms']:.1f} ms, busy "
          f"{ {k: round(v, 1) for k, v in result['plan_busy_ms'].items()} }")
    print(f"  next token same as fused: {same}; max |logit diff| {maxdiff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
