"""Chat sessions (runtime/chat.py): a follow-up turn prefills only what is not cached, and answers
as a fresh prefill of the whole conversation does; the context-full policies; cancellation; stop
strings; images in a conversation; the interactive edge-run in a real subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from serve_helpers import LONG_PROMPT, deep_bundle, real_bundle

from conftest import REPO
from edge.errors import PromptError
from edge.runtime import Model
from edge.runtime.chat import ChatSession, ContextFullError, StopMatcher, common_prefix
from edge.runtime.chat_prompt import chat_prompt

N = 12  # new tokens per answer


class PrefillSpy:
    """Counts the rows each prefill call runs (instance attribute over Model.prefill)."""

    def __init__(self, model: Model, monkeypatch):
        self.calls: list[int] = []
        orig = model.prefill

        def prefill(embeds, cache, all_logits=False):
            self.calls.append(embeds.shape[1])
            return orig(embeds, cache, all_logits)

        monkeypatch.setattr(model, "prefill", prefill, raising=False)


def test_follow_up_turns_prefill_only_what_is_not_cached(zoo, monkeypatch):
    model = zoo.model("llama", 16)
    spy = PrefillSpy(model, monkeypatch)
    session = model.chat_session(system="You are terse.")
    held: list = []  # the rows the cache holds after each turn: prompt ids + the answer ids fed back
    previous_prompt = 0
    for turn, text in enumerate(["hello world", "and then what?", "tell me more about it", "ok, thanks"]):
        ids = list(chat_prompt(model, session.messages + [{"role": "user", "content": text}]).ids)
        completion = session.stream(text, max_new_tokens=N)
        answer = "".join(completion)
        st = completion.stats
        expected = min(common_prefix(held, ids), len(ids) - 1)
        print(f"turn {turn + 1}: prompt {st.prompt_tokens} tokens, {st.cached_tokens} cached, "
              f"{st.prefilled_tokens} prefilled")
        assert st.prompt_tokens == len(ids)
        assert st.cached_tokens == expected and spy.calls[-1] == st.prefilled_tokens == len(ids) - expected
        if turn:
            assert st.cached_tokens >= previous_prompt  # the whole previous prompt was reused, at least
        assert session.cached_keys == tuple(ids + completion.token_ids)[:len(session.cached_keys)]
        held = ids + completion.token_ids[:N - 1]  # the last token is never fed back
        previous_prompt = len(ids)
        # the same answer as a fresh cache given the whole conversation
        assert model.chat(session.messages[:-1], max_new_tokens=N) == answer
        assert spy.calls[-1] == len(ids)
        assert session.messages[-1] == {"role": "assistant", "content": answer}
    assert len(session.messages) == 9  # system + 4 x (user, assistant)


def test_an_edited_history_rolls_the_cache_back_to_the_common_prefix(zoo, monkeypatch):
    """The caller (an OpenAI client) sends a previous answer other than the generated one: the
    cache is rolled back to where the token ids part, and the answer is a fresh prefill's."""
    model = zoo.model("llama", 16)
    spy = PrefillSpy(model, monkeypatch)
    session = ChatSession(model)
    first = [{"role": "user", "content": "hello world"}]
    c0 = session.complete(first, max_new_tokens=N)
    answer = "".join(c0)
    first_ids = chat_prompt(model, first).ids
    held = list(first_ids) + c0.token_ids[:N - 1]
    edited = first + [{"role": "assistant", "content": "Hi! " + answer}, {"role": "user", "content": "why?"}]
    ids = chat_prompt(model, edited).ids
    c = session.complete(edited, max_new_tokens=N)
    text = "".join(c)
    assert c.stats.cached_tokens == common_prefix(held, ids) >= len(first_ids)  # at least up to "assistant\n"
    assert c.stats.cached_tokens < len(held)  # rolled back: the generated answer is not what was sent
    assert spy.calls[-1] == len(ids) - c.stats.cached_tokens
    assert text == model.chat(edited, max_new_tokens=N)
    # the very same conversation again: all but its last row come from the cache
    again = session.complete(edited, max_new_tokens=N)
    assert "".join(again) == text and again.stats.cached_tokens == len(ids) - 1 and spy.calls[-1] == 1


def test_stream_pieces_stop_strings_and_finish_reasons(zoo):
    model = zoo.model("llama", 16)
    messages = [{"role": "user", "content": "hello world"}]
    full = model.chat(messages, max_new_tokens=40)
    session = ChatSession(model)
    c = session.complete(messages, max_new_tokens=40)
    pieces = list(c)
    assert "".join(pieces) == c.text == full and len(pieces) > 1
    assert c.stats.finish_reason in ("stop", "length") and c.stats.completion_tokens <= 40
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = session.complete(messages, max_new_tokens=40, stop=[stop])
    assert "".join(cut) == full[:full.index(stop)] and cut.stats.finish_reason == "stop"
    with pytest.raises(PromptError, match="temperature"):
        session.complete(messages, temperature=-1)


def test_stop_matcher_holds_back_what_may_begin_a_stop():
    m = StopMatcher(["</end>", "STOP"])
    out = [m.push(p) for p in ["abc<", "/e", "nd", "> more"]]
    assert out == ["abc", "", "", ""] and m.hit and m.flush() == ""
    m = StopMatcher(["STOP"])
    assert [m.push(p) for p in ["ST", "ART S", "TO"]] == ["", "START ", ""] and m.flush() == "STO"
    assert StopMatcher([]).push("x") == "x"


def test_cancel_between_tokens_keeps_the_session_usable(zoo):
    model = zoo.model("llama", 16)
    session = model.chat_session()
    cancel = threading.Event()
    c = session.stream("hello world", cancel=cancel, max_new_tokens=40)
    got = []
    for piece in c:
        got.append(piece)
        if c.stats.completion_tokens >= 3:
            cancel.set()
    assert c.stats.finish_reason == "cancelled" and c.stats.completion_tokens < 40
    assert session.messages[-1]["content"] == c.text  # the partial answer stays in the history
    follow = session.send("go on", max_new_tokens=N)
    assert follow == model.chat(session.messages[:-1], max_new_tokens=N)
    # cancelled before a single token: the turn is taken back
    cancel.set()
    before = list(session.messages)
    c = session.stream("never answered", cancel=cancel)
    assert "".join(c) == "" and c.stats.finish_reason == "cancelled" and session.messages == before


def test_context_full_refuse_or_drop_oldest_turns(zoo):
    model = zoo.model("llama", 16, 96)
    refusing = model.chat_session(system="sys")
    with pytest.raises(ContextFullError, match="drop_oldest"):
        for _ in range(10):
            refusing.send("please say something", max_new_tokens=N)
    kept = list(refusing.messages)
    with pytest.raises(ContextFullError):
        refusing.send("please say something", max_new_tokens=N)
    assert refusing.messages == kept  # a refused turn changes nothing

    dropping = model.chat_session(system="sys", overflow="drop_oldest")
    for i in range(8):
        answer = dropping.send(f"turn {i}: say something", max_new_tokens=N)
        msgs = dropping.messages
        assert msgs[0] == {"role": "system", "content": "sys"} and msgs[-2]["content"] == f"turn {i}: say something"
        n = len(chat_prompt(model, msgs[:-1]))
        assert n + N <= 96  # what was kept leaves room for the whole answer
        assert answer == model.chat(msgs[:-1], max_new_tokens=N)
    assert dropping.last.dropped_messages > 0 and len(dropping.messages) < 17
    with pytest.raises(ContextFullError):  # one message alone beyond the context
        dropping.send("x " * 200, max_new_tokens=N)


def test_a_session_is_one_answer_at_a_time(zoo):
    session = zoo.model("llama", 16).chat_session()
    c = session.stream("hello", max_new_tokens=N)
    next(iter(c))
    with pytest.raises(RuntimeError, match="already generating"):
        list(session.stream("again", max_new_tokens=N))
    c.close()
    assert session.send("fine now", max_new_tokens=N) is not None


# ---------------------------------------------------------------- images in a conversation
@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    from tiny_vlm import make_tiny_vlm

    from edge.config import ExportOptions
    from edge.export.pipeline import export_model
    from edge.progress import Progress

    root = tmp_path_factory.mktemp("chat-vlm")
    export_model(make_tiny_vlm(root / "hf"), root / "bundle", ExportOptions(chunk_length=24, max_context=512,
                                                                             plans=("fused",)), Progress(enabled=False))
    return Model.load(root / "bundle", threads=1)


def test_images_in_a_conversation_are_encoded_once(vlm, monkeypatch):
    from tiny_vlm import photos

    photo = photos()["coffee_strip_10to1"]
    session = vlm.chat_session()
    first = session.stream("What is this?", images=[photo], max_new_tokens=N)
    answer = "".join(first)
    ids, _ = vlm.prepare_prompt("What is this?", images=[photo])
    assert first.stats.prompt_tokens == len(ids)
    assert answer == vlm.generate("What is this?", images=[photo], max_new_tokens=N)
    runs = []
    orig = vlm.vision.encode
    monkeypatch.setattr(vlm.vision, "encode", lambda tiles: runs.append(len(tiles)) or orig(tiles))
    follow = session.stream("And its colour?", max_new_tokens=N)
    text = "".join(follow)
    assert runs == [] and follow.stats.cached_tokens >= len(ids)  # the image rows came from the cache
    assert text == vlm.chat(session.messages[:-1], max_new_tokens=N) and runs  # a fresh prefill encodes it
    # another image of the same size in the same place: same token ids, but not taken for the cached one
    def user(image):
        return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]

    other = np.ascontiguousarray(photo[:, ::-1])
    c = ChatSession(vlm)
    "".join(c.complete(user(photo), max_new_tokens=2))
    swapped = c.complete(user(other), max_new_tokens=2)
    "".join(swapped)
    assert chat_prompt(vlm, user(other)).ids == chat_prompt(vlm, user(photo)).ids
    first_image_row = int(np.flatnonzero(np.asarray(chat_prompt(vlm, user(other)).ids)
                                         == vlm.vision.cfg.image_token_id)[0])
    assert swapped.stats.cached_tokens == first_image_row
    assert swapped.text == vlm.chat(user(other), max_new_tokens=2)


# ---------------------------------------------------------------- interactive edge-run
def run_chat(bundle, lines: list[str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "edge.runtime.cli", str(bundle), *args],
                          input="".join(line + "\n" for line in lines).encode(), capture_output=True, cwd=REPO,
                          env=env, timeout=timeout)


def test_interactive_chat_streams_resets_and_exits(zoo):
    bundle = zoo.bundle("llama", 16)
    model = zoo.model("llama", 16)
    r = run_chat(bundle, ["hello world", "and then?", "/reset", "hi", "/bogus", "/exit", "never read"],
                 "--system", "be brief", "--max-new-tokens", str(N), "--stats")
    assert r.returncode == 0, r.stderr.decode()
    sys_msg = {"role": "system", "content": "be brief"}
    a1 = model.chat([sys_msg, {"role": "user", "content": "hello world"}], max_new_tokens=N)
    a2 = model.chat([sys_msg, {"role": "user", "content": "hello world"}, {"role": "assistant", "content": a1},
                     {"role": "user", "content": "and then?"}], max_new_tokens=N)
    a3 = model.chat([sys_msg, {"role": "user", "content": "hi"}], max_new_tokens=N)
    assert r.stdout.decode() == f"{a1}\n{a2}\n{a3}\n"
    err = r.stderr.decode()
    assert "(conversation reset)" in err and "unknown command /bogus" in err and "Traceback" not in err
    stats = [line for line in err.splitlines() if line.startswith("[prompt")]
    assert len(stats) == 3 and " 0 cached" in stats[0] and " 0 cached" not in stats[1]


def test_interactive_ctrl_c_stops_the_answer_not_the_session(tmp_path_factory):
    bundle = deep_bundle(tmp_path_factory.getbasetemp())
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edge.runtime.cli", str(bundle), "--max-new-tokens", "900",
                             "--stats", "--threads", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO, env=env)
    err: list[bytes] = []
    out = bytearray()
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    threading.Thread(target=lambda: [out.extend(b) for b in iter(lambda: proc.stdout.read1(256), b"")],
                     daemon=True).start()
    try:
        for turn in range(2):
            seen = len(out)
            proc.stdin.write(f"{LONG_PROMPT}\n".encode())
            proc.stdin.flush()
            end = time.time() + 60
            while len(out) < seen + 8 and time.time() < end:  # the answer is streaming
                time.sleep(0.01)
            proc.send_signal(signal.SIGINT)
            end = time.time() + 60
            while sum(b"[stopped]" in e for e in err) <= turn and time.time() < end:
                time.sleep(0.05)
        proc.stdin.write(b"/exit\n")
        proc.stdin.flush()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = b"".join(err).decode()
    stats = [line for line in text.splitlines() if line.startswith("[prompt")]
    assert text.count("[stopped]") == 2 and len(stats) == 2, text
    assert all(line.endswith("| cancelled]") for line in stats)
    assert all(int(line.split("|")[2].split()[0]) < 900 for line in stats)  # cut well before its budget
    assert " 0 cached" not in stats[1]  # the second turn continued the conversation


# ---------------------------------------------------------------- the real SmolLM2
@pytest.mark.real
def test_real_five_turn_conversation_prefills_only_new_tokens(tmp_path_factory, monkeypatch):
    """Each follow-up prefills exactly the tokens after the previous answer. Time to first token:
    as the turn saw it, and (best of 3, same cache rows) prefilling only the new tokens against
    re-prefilling the whole conversation from an empty cache."""
    model = Model.load(real_bundle(tmp_path_factory.getbasetemp()))
    spy = PrefillSpy(model, monkeypatch)
    session = model.chat_session(system="You are a helpful assistant.")
    questions = ["What is the capital of France?", "Tell me about its history in detail.",
                 "What river flows through it? Describe it.", "Name three famous bridges over that river.",
                 "Which museums should I visit there, and why?"]
    rows = []
    held: list = []
    for turn, q in enumerate(questions, 1):
        c = session.stream(q, max_new_tokens=128)
        answer = "".join(c)
        st = c.stats
        ids = list(chat_prompt(model, session.messages[:-1]).ids)
        assert spy.calls[-1] == st.prefilled_tokens
        if turn > 1:
            # the template re-renders the previous answer to the ids that were generated: the cache
            # covers the whole previous prompt + answer, only the new turn's tokens are prefilled
            assert st.cached_tokens == len(held), (st.cached_tokens, len(held))
        held = ids + c.token_ids[:len(c.token_ids) - (st.finish_reason == "length")]
        rows.append((turn, st.prompt_tokens, st.cached_tokens, st.prefilled_tokens, st.ttft_s,
                     first_token_s(model, ids, st.cached_tokens), first_token_s(model, ids, 0)))
        if turn == 1:
            assert "Paris" in answer
    print(f"\nload average {os.getloadavg()[0]:.1f}, chunk {model.chunk_length}")
    print("| turn | prompt tokens | cached | prefilled | TTFT in the session ms | new tokens only, best of 3 ms "
          "| whole conversation, best of 3 ms |")
    for t, n, cached, pre, live, new, full in rows:
        print(f"| {t} | {n} | {cached} | {pre} | {1e3 * live:.0f} | {1e3 * new:.0f} | {1e3 * full:.0f} |")
    assert all(pre < n / 2 for _, n, _, pre, *_ in rows[1:])


def first_token_s(model: Model, ids: list[int], cached: int, repeats: int = 3) -> float:
    """Best time to the first token with rows [0, cached) already in the cache."""
    cache = model.new_cache()
    if cached:
        model.prefill(model.embed(ids[:cached]), cache)
    best = float("inf")
    for _ in range(repeats):
        cache.length = cached
        t0 = time.perf_counter()
        next(model.generate_ids(ids[cached:], 1, cache=cache))
        best = min(best, time.perf_counter() - t0)
    return best
