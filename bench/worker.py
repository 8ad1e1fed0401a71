"""The measurement protocol edge-bench applies to every system (ours and the peers), stdlib + numpy.

One child process measures one system at one prompt length: it loads the model, runs ``warmup``
untimed generations, then ``repeat`` timed ones, each from an empty cache:

- time to first token (TTFT): the prompt's token ids in (tokenization excluded, the same ids for
  every system), the first greedy token out: embedding + prefill + argmax;
- prefill tokens/s = prompt tokens / TTFT;
- decode tokens/s = ``new_tokens`` decode steps (each feeds the previous greedy token and takes
  the argmax; end-of-text does not stop it) / their time;
- peak resident memory: the child's high-water mark (``VmHWM`` in /proc/self/status) at the end,
  so it covers loading, every run and the interpreter itself.

A worker is ``python -m MODULE --worker SPEC.json``; it writes its result as JSON to
``spec["result"]``: ``{"status": "ok", ...}`` or ``{"status": "skipped" | "failed", "reason": ...}``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from typing import Any, Callable

import numpy as np

SCHEMA = "edge-bench/1"


class Skip(Exception):
    """The system cannot be measured here (a missing package or file): reported, never as zero."""


def _proc_status_kib(key: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), MiB; getrusage where /proc is missing."""
    kib = _proc_status_kib("VmHWM")
    if kib is None:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kib = r / 1024 if sys.platform == "darwin" else r
    return kib / 1024


def rss_mib() -> float | None:
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib / 1024


def greedy(logits: Any) -> int:
    return int(np.argmax(np.asarray(logits).reshape(-1)))


def time_generation(prefill: Callable[[list[int]], Any], decode: Callable[[int], Any], reset: Callable[[], None],
                    ids: list[int], new_tokens: int, repeat: int, warmup: int = 1,
                    generate: Callable[[Any, int], list[int]] | None = None) -> dict[str, Any]:
    """``reset()`` empties the cache; ``prefill(ids)`` / ``decode(token)`` return the last logits;
    ``generate(logits, n)``, where given, replaces the one-token-per-call loop: the n + 1 greedy
    tokens after the prompt's logits, the first included (edge's prompt lookup decoding).
    Returns the raw per-run figures and the greedy tokens of the first timed run."""
    ttft, decode_s, tokens = [], [], []
    for r in range(warmup + repeat):
        reset()
        t0 = time.perf_counter()
        logits = prefill(ids)
        tok = greedy(logits)
        t1 = time.perf_counter()
        if generate is not None:
            out = generate(logits, new_tokens)
        else:
            out = [tok]
            for _ in range(new_tokens):
                tok = greedy(decode(tok))
                out.append(tok)
        t2 = time.perf_counter()
        if r >= warmup:
            ttft.append(t1 - t0)
            decode_s.append(t2 - t1)
            if not tokens:
                tokens = out
    n = len(ids)
    return {
        "ttft_s": ttft,
        "prefill_tok_s": [n / t for t in ttft],
        "decode_tok_s": [new_tokens / t if new_tokens else None for t in decode_s],
        "tokens": tokens,
    }


def lookup_config(stats: Any, draft_tokens: int, runs: int) -> dict[str, Any]:
    """A result's config entry for edge's lookup loop (edge.runtime.lookup.LookupStats), summed over ``runs``."""
    return {"draft_tokens": draft_tokens, "calls": stats.calls, "drafted": stats.drafted, "kept": stats.kept,
            "runs": runs}


def folder_size(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a folder."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def worker_main(measure: Callable[[dict], dict], argv: list[str] | None = None,
                prepare: Callable[[dict], dict] | None = None) -> int:
    """Entry point of a worker child: ``--worker SPEC.json`` runs ``measure(spec)``, ``--prepare
    SPEC.json`` runs ``prepare(spec)`` (a peer's one-time set-up, e.g. an export, kept out of the
    measured child's memory). Either returns a dict or raises Skip; the result file always gets a
    status."""
    argv = sys.argv[1:] if argv is None else argv
    actions = {"--worker": measure, **({"--prepare": prepare} if prepare else {})}
    if len(argv) != 2 or argv[0] not in actions:
        print(f"usage: python -m MODULE {{{'|'.join(actions)}}} SPEC.json (run by edge-bench)", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    t0 = time.perf_counter()
    try:
        result = {"status": "ok", **actions[argv[0]](spec)}
    except Skip as e:
        result = {"status": "skipped", "reason": str(e)}
    except Exception as e:  # reported as failed with the cause, the other systems go on
        traceback.print_exc()
        result = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:2000]}
    result["peak_rss_mib"] = peak_rss_mib() if result["status"] == "ok" else None
    result["child_s"] = time.perf_counter() - t0
    with open(spec["result"], "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0
