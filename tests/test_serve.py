"""edge-serve as a real process on 127.0.0.1 (a free port), driven by the official openai client
and by plain HTTP: chat and completions, streaming and not; a bounded load test; malformed,
oversized and unauthorised requests; a client that disconnects; a full queue; SIGTERM."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import signal
import socket
import threading
import time

import pytest
from serve_helpers import LONG_PROMPT, ServerProcess, deep_bundle, real_bundle, sse_events, stream_lines

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

N = 12
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def tiny(zoo):
    bundle = zoo.bundle("llama", 16)
    with ServerProcess(bundle, "--parallel", "2", "--max-tokens-limit", "64", "--max-body-bytes", "65536") as s:
        yield s, zoo.model("llama", 16), bundle.name


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    return deep_bundle(tmp_path_factory.getbasetemp())


def test_openai_client_chat_and_completions(tiny):
    server, model, name = tiny
    client = server.client()
    assert [m.id for m in client.models.list().data] == [name]
    expected = model.chat(CHAT, max_new_tokens=N)
    r = client.chat.completions.create(model=name, messages=CHAT, max_tokens=N, temperature=0)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.choices[0].finish_reason in ("stop", "length")
    from edge.runtime.chat_prompt import chat_prompt

    n_prompt = len(chat_prompt(model, CHAT))
    assert r.usage.prompt_tokens == n_prompt and r.usage.total_tokens == n_prompt + r.usage.completion_tokens

    stream = client.chat.completions.create(model=name, messages=CHAT, max_tokens=N, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected and chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: served from a slot

    raw = model.generate("Once upon a time", max_new_tokens=N, raw=True)
    c = client.completions.create(model=name, prompt="Once upon a time", max_tokens=N, temperature=0)
    assert c.choices[0].text == raw and c.usage.completion_tokens <= N
    pieces = [p.choices[0].text for p in client.completions.create(model=name, prompt="Once upon a time",
                                                                   max_tokens=N, temperature=0, stream=True)]
    assert "".join(pieces) == raw
    ids = model.tokenizer.encode("Once upon a time")
    assert client.completions.create(model=name, prompt=ids, max_tokens=N, temperature=0).choices[0].text == raw

    # the wire format itself: SSE chunks, then data: [DONE]
    conn, resp = stream_lines(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 3, "stream": True,
                                                                 "temperature": 0})
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = sse_events(resp)
    conn.close()
    assert events[-1] == "[DONE]" and all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])
    # sampling fields map to edge's: a seed fixes a sampled answer
    a, b = (client.chat.completions.create(model=name, messages=CHAT, max_tokens=N, temperature=0.9, top_p=0.9,
                                           seed=7).choices[0].message.content for _ in range(2))
    assert a == b == model.chat(CHAT, max_new_tokens=N, temperature=0.9, top_p=0.9, seed=7)
    stop = expected[3:5]
    r = client.chat.completions.create(model=name, messages=CHAT, max_tokens=N, temperature=0, stop=[stop])
    assert r.choices[0].message.content == expected[:expected.index(stop)] and r.choices[0].finish_reason == "stop"


def test_load_50_requests_from_8_clients(tiny):
    """Nothing lost, every answer complete (ignore_eos: exactly max_tokens each), greedy answers
    equal to the single-client ones."""
    server, model, name = tiny
    client = server.client()
    prompts = [f"question number {i}: what do you think?" for i in range(10)]
    before = server.wait_idle()["counters"]

    def ask(i: int) -> tuple[str, int, str]:
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompts[i % 10]}],
                                           max_tokens=N, temperature=0, extra_body={"ignore_eos": True})
        return r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason

    single = [ask(i) for i in range(10)]
    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(50)))
    assert len(answers) == 50
    assert all(a == single[i % 10] for i, a in enumerate(answers))
    assert all(n == N and fr == "length" for _, n, fr in answers)
    after = server.wait_idle()["counters"]
    assert after["completed"] - before["completed"] == 60 and after["errors"] == before["errors"]
    assert after["completion_tokens"] - before["completion_tokens"] == 60 * N


def error_of(server, body, path="/v1/chat/completions", headers=None) -> tuple[int, dict]:
    status, _, data = server.request("POST", path, body, headers)
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return status, err


def test_malformed_wrong_and_oversized_requests(tiny):
    server, model, name = tiny
    ok = {"messages": CHAT, "max_tokens": 2}
    assert error_of(server, b"{not json")[0] == 400
    assert error_of(server, b"[1, 2]")[1]["code"] == "invalid_json"
    assert error_of(server, b'{"messages": NaN}')[0] == 400
    assert error_of(server, b"\xff\xfe")[0] == 400
    for field, value in [("messages", "hello"), ("messages", []), ("messages", [{"role": "king", "content": "x"}]),
                         ("messages", [{"role": "user", "content": 5}]), ("temperature", "hot"), ("temperature", 3),
                         ("top_p", 0), ("max_tokens", -1), ("max_tokens", 1.5), ("stream", "yes"), ("n", 2),
                         ("stop", ["a", "b", "c", "d", "e"]), ("seed", "x"), ("tools", [{"type": "function"}]),
                         ("logprobs", True), ("stream_options", {"include_usage": True})]:
        status, err = error_of(server, {**ok, field: value})
        assert status == 400 and err["param"] and err["param"].split("[")[0].split(".")[0] == field, (field, err)
    status, err = error_of(server, {**ok, "max_tokens": 65})
    assert status == 400 and err["code"] == "max_tokens_exceeded"
    status, err = error_of(server, {**ok, "model": "gpt-4"})
    assert status == 404 and err["code"] == "model_not_found"
    status, err = error_of(server, {"messages": [{"role": "user", "content": "word " * 400}]})
    assert status == 400 and err["code"] == "context_length_exceeded"
    png = base64.b64encode(b"\x89PNG....").decode()
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]}
    status, err = error_of(server, {"messages": [image]})
    assert status == 400 and err["code"] == "images_not_supported"
    status, err = error_of(server, {"prompt": ["a", "b"]}, "/v1/completions")
    assert status == 400 and err["param"] == "prompt"
    assert error_of(server, {"prompt": [999999]}, "/v1/completions")[0] == 400
    # body size: refused from Content-Length, and while reading a chunked body
    status, err = error_of(server, json.dumps({**ok, "pad": "x" * 70000}).encode())
    assert status == 413 and err["code"] == "request_too_large"
    assert chunked_post(server, b"{" + b" " * 70000 + b"}") == 413
    status, _, data = server.request("GET", "/v2/nothing")
    assert status == 404 and json.loads(data)["error"]["code"] == "not_found"
    assert server.request("GET", "/v1/chat/completions")[0] == 405
    # the openai client sees the same errors as its exceptions
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=name, messages=CHAT, max_tokens=1000)
    assert server.health()["status"] == "ok"  # and the server keeps serving
    assert client.chat.completions.create(model=name, messages=CHAT, max_tokens=2).choices[0].message is not None


def chunked_post(server, body: bytes) -> int:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            for i in range(0, len(body), 8192):
                part = body[i:i + 8192]
                s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            s.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server may answer and close before the whole body is sent
        return int(s.recv(4096).split(b" ")[1])


def test_api_key(zoo):
    with ServerProcess(zoo.bundle("llama", 16), "--api-key", "s3cret") as server:
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        status, headers, data = server.request("GET", "/v1/models")
        assert status == 401 and json.loads(data)["error"]["code"] == "invalid_api_key"
        assert headers["www-authenticate"] == "Bearer"
        assert server.request("GET", "/health")[0] == 200  # health needs no key
        r = server.client(api_key="s3cret").chat.completions.create(model=zoo.bundle("llama", 16).name, messages=CHAT,
                                                                    max_tokens=2)
        assert r.usage.completion_tokens <= 2


LONG = {"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 900, "temperature": 0,
        "ignore_eos": True}


def test_a_client_that_disconnects_stops_its_generation(deep):
    with ServerProcess(deep, "--parallel", "2") as server:
        conn, resp = stream_lines(server, "/v1/chat/completions", {**LONG, "stream": True})
        assert len(sse_events(resp, limit=4)) == 4  # streaming
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        h = server.wait_idle()
        assert h["counters"]["cancelled_disconnect"] == 1 and h["counters"]["completed"] == 0
        assert h["counters"]["completion_tokens"] < 300  # of 900 asked for
        # a non-streaming request whose client gives up
        s = raw_post(server, LONG)
        wait_for(lambda: server.health()["slots"]["busy"] == 1)
        time.sleep(0.3)
        s.close()
        h = server.wait_idle()
        assert h["counters"]["cancelled_disconnect"] == 2 and h["counters"]["completion_tokens"] < 600
        assert any("cancelled (disconnect)" in line for line in server.log)


def wait_for(cond, timeout: float = 60) -> None:
    end = time.time() + timeout
    while not cond():
        if time.time() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


def raw_post(server, body: dict) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port))
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return s


def test_a_full_queue_answers_429(deep):
    with ServerProcess(deep, "--parallel", "1", "--queue", "2", "--drain-timeout", "0") as server:
        conn, resp = stream_lines(server, "/v1/chat/completions", {**LONG, "stream": True})
        assert len(sse_events(resp, limit=2)) == 2  # the one slot is busy
        gives_up = raw_post(server, {**LONG, "max_tokens": 2})
        wait_for(lambda: server.health()["queue"]["waiting"] == 1)
        waiting = threading.Thread(target=lambda: server.request("POST", "/v1/chat/completions", {**LONG,
                                                                 "max_tokens": 2}), daemon=True)
        waiting.start()
        wait_for(lambda: server.health()["queue"]["waiting"] == 2)
        status, headers, data = server.request("POST", "/v1/chat/completions", {**LONG, "max_tokens": 2})
        assert status == 429 and headers["retry-after"] == "1"
        assert json.loads(data)["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            server.client().chat.completions.create(model=deep.name, messages=CHAT, max_tokens=2)
        assert server.health()["counters"]["rejected_queue_full"] == 2
        gives_up.close()  # a client that leaves the queue frees its place
        wait_for(lambda: server.health()["queue"]["waiting"] == 1)
        conn.close()  # the slot frees, the queued request runs
        waiting.join(60)
        assert not waiting.is_alive()
        c = server.wait_idle()["counters"]
        assert c["requests"] == 2 and c["completed"] == 1 and c["cancelled_disconnect"] == 1


def test_sigterm_drains_then_exits_cleanly(deep):
    # drain: an answer in flight finishes within the drain timeout, then the process exits 0
    server = ServerProcess(deep, "--drain-timeout", "60")
    conn, resp = stream_lines(server, "/v1/chat/completions", {**LONG, "max_tokens": 60, "stream": True})
    first = sse_events(resp, limit=2)
    server.proc.send_signal(signal.SIGTERM)
    events = first + sse_events(resp)
    conn.close()
    assert server.stop() == 0
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text  # the whole answer came
    assert any("SIGTERM: draining" in line for line in server.log) and server.log[-1] == "edge-serve: stopped"

    # cancel: an answer longer than the drain timeout is cut, its stream ends with an error event
    server = ServerProcess(deep, "--drain-timeout", "0.5")
    conn, resp = stream_lines(server, "/v1/chat/completions", {**LONG, "stream": True})
    sse_events(resp, limit=2)
    t0 = time.time()
    server.proc.send_signal(signal.SIGTERM)
    events = sse_events(resp)
    conn.close()
    assert server.stop() == 0 and time.time() - t0 < 20
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "shutting_down"
    assert any("cancelled (shutdown)" in line for line in server.log)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


# ---------------------------------------------------------------- images
def test_vision_bundle_takes_image_url_data_urls(tmp_path_factory):
    from PIL import Image
    from tiny_vlm import make_tiny_vlm, photos

    from edge.config import ExportOptions
    from edge.export.pipeline import export_model
    from edge.progress import Progress
    from edge.runtime import Model

    root = tmp_path_factory.mktemp("serve-vlm")
    bundle = root / "bundle"
    export_model(make_tiny_vlm(root / "hf"), bundle, ExportOptions(chunk_length=24, max_context=512, plans=("fused",)),
                 Progress(enabled=False))
    buf = io.BytesIO()
    Image.fromarray(photos()["coffee_strip_10to1"]).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    expected = Model.load(bundle, threads=1).generate("What is this?", images=[buf.getvalue()], max_new_tokens=N)
    with ServerProcess(bundle) as server:
        client = server.client()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]
        r = client.chat.completions.create(model=bundle.name, messages=[{"role": "user", "content": content}],
                                           max_tokens=N, temperature=0)
        assert r.choices[0].message.content == expected
        status, err = error_of(server, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]})
        assert status == 400 and "data: URLs" in err["message"]
        status, err = error_of(server, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})
        assert status == 400 and "image" in err["message"]


# ---------------------------------------------------------------- the real SmolLM2
@pytest.mark.real
def test_real_openai_streaming_answer_says_paris(tmp_path_factory):
    bundle = real_bundle(tmp_path_factory.getbasetemp())
    with ServerProcess(bundle, "--parallel", "2") as server:
        stream = server.client().chat.completions.create(
            model=bundle.name, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=32, temperature=0, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        answer = "".join(pieces)
        print(f"\n{answer!r} in {len(pieces)} chunks")
        assert "Paris" in answer and len(pieces) > 3
