"""Load test of edge-serve: requests/s and latency percentiles at several client counts.

    python -m edge.bench.serve_load BUNDLE [--clients 1,4,8] [--requests 24] [--max-tokens 32]
                                    [--parallel 4] [--threads 0] [--json FILE]
    python -m edge.bench.serve_load --url http://127.0.0.1:8080 ...   (a server already running)

Starts ``edge-serve BUNDLE --parallel P`` on a free 127.0.0.1 port (unless ``--url``), then for each
client count C sends ``--requests`` streaming chat completions from C threads at once (plain
http.client, no SDK): distinct short questions, greedy, ``ignore_eos`` so that every answer is
exactly ``--max-tokens`` tokens. Per request: latency (request sent -> ``data: [DONE]``) and time
to first token (-> first text chunk). Per client count: requests/s and generated tokens/s over the
wall time, p50/p95 latency and TTFT. Prints a Markdown table with the date, the machine and its
load average; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from urllib.parse import urlparse

import numpy as np

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "What is 12 times 12?",
             "Who wrote Hamlet?", "What is the boiling point of water?", "Give me a synonym for happy.",
             "What is the largest planet?", "How many legs does a spider have?", "What language is spoken in Brazil?",
             "What is photosynthesis?", "Name a famous bridge in London.", "What is the speed of light?"]


def start_server(bundle: str, parallel: int, threads: int, queue: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "edge.runtime.serve_cli", bundle, "--port", "0", "--parallel",
                             str(parallel), "--threads", str(threads), "--queue", str(queue), "--quiet"],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "edge-serve: serving" in line:
            url = line.split(" on ")[1].split()[0]
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, url
    raise SystemExit(f"serve_load: edge-serve did not start (exit {proc.wait()})")


def one_request(url: str, model: str, question: str, max_tokens: int) -> dict:
    u = urlparse(url)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "ignore_eos": True,
                       "stream_options": {"include_usage": True}}).encode()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    t0 = time.perf_counter()
    first, tokens, done = None, 0, False
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return {"error": f"HTTP {resp.status}: {resp.read()[:200]!r}"}
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                return {"error": event["error"]["message"]}
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    finally:
        conn.close()
    end = time.perf_counter()
    if not done:
        return {"error": "stream ended without [DONE]"}
    return {"latency": end - t0, "ttft": (first or end) - t0, "tokens": tokens}


def run_level(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: one_request(url, model, QUESTIONS[i % len(QUESTIONS)], max_tokens),
                                range(requests)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    lat = np.array([r["latency"] for r in ok]) * 1e3
    ttft = np.array([r["ttft"] for r in ok]) * 1e3
    return {"clients": clients, "requests": requests, "ok": len(ok), "errors": [r["error"] for r in results
                                                                                if "error" in r][:5],
            "wall_s": wall, "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95))} if ok else {},
            "ttft_ms": {"p50": float(np.percentile(ttft, 50)), "p95": float(np.percentile(ttft, 95))} if ok else {}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge.bench.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", nargs="?", help="bundle to serve (omit with --url)")
    p.add_argument("--url", help="an edge-serve already running (its --parallel is then whatever it was given)")
    p.add_argument("--clients", default="1,4,8", help="client counts, comma-separated (default 1,4,8)")
    p.add_argument("--requests", type=int, default=24, help="requests per client count (default 24)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (default 32)")
    p.add_argument("--parallel", type=int, default=4, help="edge-serve --parallel (default 4)")
    p.add_argument("--threads", type=int, default=0, help="edge-serve --threads (default 0: onnxruntime's)")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    args = p.parse_args(argv)
    if bool(args.bundle) == bool(args.url):
        p.error("give BUNDLE or --url")
    levels = [int(c) for c in args.clients.split(",")]
    proc = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        proc, url = start_server(args.bundle, args.parallel, args.threads, queue=max(levels) + args.requests)
    try:
        u = urlparse(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        conn.request("GET", "/v1/models")
        model = json.loads(conn.getresponse().read())["data"][0]["id"]
        conn.close()
        one_request(url, model, "warm up", args.max_tokens)  # first-run allocations out of the figures
        load_before = os.getloadavg()
        rows = [run_level(url, model, c, args.requests, args.max_tokens) for c in levels]
        load_after = os.getloadavg()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": platform.machine(),
              "cpus": os.cpu_count(), "processor": _cpu_name(), "load_avg_before": load_before,
              "load_avg_after": load_after, "bundle": args.bundle or url, "parallel": None if args.url else args.parallel,
              "threads": args.threads, "max_tokens": args.max_tokens, "levels": rows}
    print(f"edge-serve load test, {report['date']}, {report['processor']} ({report['cpus']} CPUs), load average "
          f"{load_before[0]:.1f} before / {load_after[0]:.1f} after; --parallel {args.parallel}, {args.requests} "
          f"streaming requests per level, {args.max_tokens} tokens each\n")
    print("| clients | requests/s | tokens/s | latency p50 ms | latency p95 ms | TTFT p50 ms | TTFT p95 ms | ok |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        lat, tt = r["latency_ms"], r["ttft_ms"]
        print(f"| {r['clients']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | {lat.get('p50', 0):,.0f} | "
              f"{lat.get('p95', 0):,.0f} | {tt.get('p50', 0):,.0f} | {tt.get('p95', 0):,.0f} | "
              f"{r['ok']}/{r['requests']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if all(r["ok"] == r["requests"] for r in rows) else 1


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
