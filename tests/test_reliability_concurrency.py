"""One loaded Model serves several threads at once (onnxruntime sessions are thread-safe; each
generation has its own KV cache, sampler and stream decoder), and many generations in a row do
not grow resident memory (edge.bench.soak)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["hello", "the cat sat on the mat", "a" * 40, "What is the capital of France?", "1 2 3 4 5"]
# 10 requests: greedy and seeded sampling, chat template and raw, different lengths
REQUESTS = [dict(prompt=p, raw=bool(i % 2), max_new_tokens=12 + i,
                 **(dict(temperature=0.9, top_k=20, top_p=0.9, seed=i) if i % 3 else {}))
            for i, p in enumerate(PROMPTS * 2)]


def run(model, req: dict) -> tuple[str, list[int]]:
    kw = dict(req)
    prompt, raw = kw.pop("prompt"), kw.pop("raw")
    text = model.generate(prompt, raw=raw, **kw)
    pieces = "".join(model.stream(prompt, raw=raw, **kw))
    assert pieces == text
    return text, model.encode_prompt(prompt, raw=raw)


def test_four_threads_share_one_model(zoo):
    """4 threads x 10 generations on one Model, started together: each output equals the sequential one."""
    model = zoo.model("llama")
    expected = [run(model, r) for r in REQUESTS]
    assert len({t for t, _ in expected}) > 5  # the requests really differ
    barrier = threading.Barrier(4)
    results: dict[tuple[int, int], tuple] = {}
    errors = []

    def worker(w: int) -> None:
        try:
            barrier.wait(timeout=30)
            order = REQUESTS[w:] + REQUESTS[:w]  # each thread in a different order
            for k, req in enumerate(order):
                results[(w, (k + w) % len(REQUESTS))] = run(model, req)
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(results) == 40
    for (w, i), got in results.items():
        assert got == expected[i], (w, REQUESTS[i])


def test_threads_with_their_own_caches_interleave_decode_steps(zoo):
    """The low-level API: two generations advanced step by step, alternately, on one Model give the
    same ids as each run alone (no state shared between caches)."""
    model = zoo.model("llama")
    a_ids, b_ids = model.encode_prompt("hello"), model.encode_prompt("the cat sat", raw=True)
    alone = [list(model.generate_ids(ids, 10, stop_ids=[])) for ids in (a_ids, b_ids)]
    gens = [model.generate_ids(ids, 10, stop_ids=[]) for ids in (a_ids, b_ids)]
    together = [[], []]
    for _ in range(10):
        for k, g in enumerate(gens):
            together[k].append(next(g))
    assert together == alone


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux)")
def test_soak_script_reports_no_memory_growth(zoo):
    """edge.bench.soak, shortened: memory after warm-up stays within 5%."""
    bundle = zoo.bundle("llama")
    r = subprocess.run([sys.executable, "-m", "edge.bench.soak", str(bundle), "--generations", "80",
                        "--warmup", "20", "--max-new-tokens", "16", "--threads", "1", "--json"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["generations"] == 80 and report["tokens_generated"] > 80
    assert report["growth_pct"] < 5, report
