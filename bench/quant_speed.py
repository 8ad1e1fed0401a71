"""Prefill speed and size of a quantized bundle against its float twin, same process, interleaved.

    python -m edge.bench.quant_speed FLOAT_BUNDLE QUANT_BUNDLE [--tokens 512] [--repeat 7] [--threads 2]

Both bundles run the same prompt (the first N tokens of the pydoc text) through their fused
prefill chunk graphs on the CPU execution provider. Runs alternate between the two bundles so that
a noisy machine slows both alike; the best and the median run are reported, the ratio from the
best. Decode (one token, int8/int4 weights) is timed too, over the same prompt.

With --accel, the split plan's accelerator-lane graphs (the int8 linear blocks the paper puts on
the NPU: qkv, o_proj, gate_up, down of every layer) are timed alone on the CPU EP as well: one
chunk through all of them, float against quantized (both bundles exported with --plans fused,split).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path


from edge.runtime.model import Model
from edge.runtime.perplexity import default_text


def bundle_bytes(model: Model) -> int:
    return sum(r["size"] for r in model.bundle.manifest.files.values())


def time_prefill(model: Model, ids: list[int]) -> float:
    cache = model.new_cache()
    t = time.perf_counter()
    model.prefill(model.embed(ids), cache)
    return time.perf_counter() - t


def time_decode(model: Model, ids: list[int], steps: int) -> float:
    cache = model.new_cache()
    model.prefill(model.embed(ids), cache)
    t = time.perf_counter()
    for i in range(steps):
        model.decode_step(ids[i % len(ids)], cache)
    return (time.perf_counter() - t) / steps


def accel_chunk_runner(model: Model, threads: int) -> Callable[[], None]:
    """One chunk through every accelerator-lane graph of the split plan (random inputs: int8 and
    float kernels take the same time whatever the values)."""
    import numpy as np
    import onnxruntime as ort

    from edge.runtime.sessions import session_options

    m = model.bundle.manifest
    if m.plans is None or m.plans.split is None:
        raise SystemExit(f"{model.bundle.path}: no split plan (export with --plans fused,split)")
    rng = np.random.default_rng(0)
    runs = []
    for stage in m.plans.split.stages:
        if stage.lane != "accel":
            continue
        for key in stage.graphs:
            so = session_options(threads)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # 120 idle pools must not spin
            sess = ort.InferenceSession(str(model.bundle.file(m.graphs[key].file)), so,
                                        providers=["CPUExecutionProvider"])
            feeds = {i.name: rng.normal(size=i.shape).astype(np.float32) for i in sess.get_inputs()}
            runs.append((sess, feeds))

    def run() -> None:
        for sess, feeds in runs:
            sess.run(None, feeds)

    return run


def time_call(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("float_bundle", type=Path)
    p.add_argument("quant_bundle", type=Path)
    p.add_argument("--tokens", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--decode-steps", type=int, default=32, help="decode steps timed after the prompt (0: skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--accel", action="store_true", help="also time the split plan's accelerator-lane graphs")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    models = {"float": Model.load(args.float_bundle, threads=args.threads),
              "quant": Model.load(args.quant_bundle, threads=args.threads)}
    ids = models["float"].tokenizer.encode(default_text())[: args.tokens]
    for m in models.values():  # warm up: first runs allocate and prepack
        time_prefill(m, ids)
    runs: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.repeat):
        for k, m in models.items():
            runs[k].append(time_prefill(m, ids))
    decode = {k: time_decode(m, ids, args.decode_steps) for k, m in models.items()} if args.decode_steps else {}
    accel: dict[str, list[float]] = {}
    if args.accel:
        runners = {k: accel_chunk_runner(m, args.threads) for k, m in models.items()}
        for r in runners.values():
            r()
        for _ in range(args.repeat):
            for k, r in runners.items():
                accel.setdefault(k, []).append(time_call(r))
    res = {
        "prompt_tokens": len(ids), "threads": args.threads, "chunk": models["quant"].chunk_length,
        "context": models["quant"].max_context,
        "quantization": {k: v for k, v in models["quant"].bundle.manifest.quantization.items()
                         if k in ("prefill", "decode")},
        **{f"{k}_prefill_tok_s": {"best": len(ids) / min(v), "median": len(ids) / statistics.median(v)}
           for k, v in runs.items()},
        "prefill_speedup": min(runs["float"]) / min(runs["quant"]),
        "prefill_speedup_median": statistics.median(runs["float"]) / statistics.median(runs["quant"]),
        **{f"{k}_decode_tok_s": 1 / v for k, v in decode.items()},
        "float_bytes": bundle_bytes(models["float"]), "quant_bytes": bundle_bytes(models["quant"]),
    }
    res["size_ratio"] = res["quant_bytes"] / res["float_bytes"]
    if accel:
        chunk = models["quant"].chunk_length
        res.update({f"{k}_accel_tok_s": chunk / min(v) for k, v in accel.items()})
        res["accel_speedup"] = min(accel["float"]) / min(accel["quant"])
    if args.json:
        print(json.dumps(res))
    else:
        f, q = res["float_prefill_tok_s"], res["quant_prefill_tok_s"]
        print(f"prefill, {len(ids)} tokens, chunk {res['chunk']}, context {res['context']}, {args.threads} threads:")
        print(f"  float  {f['best']:8.1f} tok/s (median {f['median']:.1f})")
        print(f"  quant  {q['best']:8.1f} tok/s (median {q['median']:.1f})   {res['quantization']}")
        print(f"  speedup {res['prefill_speedup']:.2f}x (medians {res['prefill_speedup_median']:.2f}x)")
        if accel:
            print(f"accelerator-lane linear blocks (one {res['chunk']}-token chunk, CPU EP): float "
                  f"{res['float_accel_tok_s']:.0f} tok/s, quant {res['quant_accel_tok_s']:.0f} tok/s, "
                  f"speedup {res['accel_speedup']:.2f}x")
        if decode:
            print(f"decode: float {res['float_decode_tok_s']:.1f} tok/s, quant {res['quant_decode_tok_s']:.1f} tok/s")
        print(f"bundle size: {res['quant_bytes'] / 1e6:.1f} MB / {res['float_bytes'] / 1e6:.1f} MB = "
              f"{100 * res['size_ratio']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
