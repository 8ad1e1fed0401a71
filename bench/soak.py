"""Soak test: many generations in a row on one loaded model; does resident memory grow?

    python -m edge.bench.soak BUNDLE [--generations 300] [--warmup 30] [--max-new-tokens 32] [--json]

Prompts of several lengths, greedy and seeded sampling alternate (a warm-up of at least one full
cycle sees every shape, so onnxruntime's arena has reached its size). Resident memory is read from
/proc/self/statm after every generation; growth = last sample vs the first sample after warm-up.
Exit status 1 if growth exceeds --max-growth percent (default 5).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue, then list three colours of the rainbow.",
    "hi",
    "Summarise: " + "The quick brown fox jumps over the lazy dog. " * 12,
]
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def soak(bundle: str, generations: int, warmup: int, max_new_tokens: int, threads: int) -> dict:
    from edge.runtime import Model

    model = Model.load(bundle, threads=threads)
    rss_loaded = rss_bytes()
    room = model.max_context - max_new_tokens
    fits = lambda text: len(model.tokenizer.encode_chat([{"role": "user", "content": text}])) <= room  # noqa: E731
    prompts = [text for text in PROMPTS if fits(text)]
    if not prompts:
        raise SystemExit(f"{bundle}: no test prompt fits a context of {model.max_context} with {max_new_tokens} new tokens")
    samples, tokens, t0 = [], 0, time.perf_counter()
    for i in range(generations):
        ids = model.encode_prompt(prompts[i % len(prompts)])
        sampled = dict(temperature=0.8, top_p=0.95, seed=i) if i % 2 else {}
        tokens += sum(1 for _ in model.generate_ids(ids, max_new_tokens, _params(sampled)))
        samples.append(rss_bytes())
    elapsed = time.perf_counter() - t0
    after = samples[warmup:]
    base, last, peak = after[0], after[-1], max(after)
    # least-squares slope over the post-warm-up samples (bytes per generation)
    n = len(after)
    xm, ym = (n - 1) / 2, sum(after) / n
    slope = sum((x - xm) * (y - ym) for x, y in enumerate(after)) / max(sum((x - xm) ** 2 for x in range(n)), 1)
    return {
        "bundle": str(bundle), "generations": generations, "warmup": warmup, "max_new_tokens": max_new_tokens,
        "tokens_generated": tokens, "seconds": round(elapsed, 1),
        "rss_after_load_mb": round(rss_loaded / 2**20, 1),
        "rss_after_warmup_mb": round(base / 2**20, 1),
        "rss_final_mb": round(last / 2**20, 1),
        "rss_peak_after_warmup_mb": round(peak / 2**20, 1),
        "growth_pct": round(100 * (last - base) / base, 2),
        "peak_growth_pct": round(100 * (peak - base) / base, 2),
        "slope_kb_per_generation": round(slope / 1024, 2),
    }


def _params(kw: dict):
    from edge.runtime import SamplingParams

    return SamplingParams(**kw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--generations", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30, help="generations before the baseline sample")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-growth", type=float, default=5.0, help="percent; exit status 1 above it")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not 0 < args.warmup < args.generations:
        p.error("need 0 < --warmup < --generations")
    r = soak(args.bundle, args.generations, args.warmup, args.max_new_tokens, args.threads)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['generations']} generations ({r['tokens_generated']} tokens) in {r['seconds']} s on {r['bundle']}")
        print(f"RSS: {r['rss_after_load_mb']} MB after load, {r['rss_after_warmup_mb']} MB after {r['warmup']} "
              f"warm-up generations, {r['rss_final_mb']} MB at the end (peak {r['rss_peak_after_warmup_mb']} MB)")
        print(f"growth after warm-up: {r['growth_pct']}% (peak {r['peak_growth_pct']}%), "
              f"trend {r['slope_kb_per_generation']} KB/generation")
    return 0 if r["growth_pct"] <= args.max_growth else 1


if __name__ == "__main__":
    sys.exit(main())
