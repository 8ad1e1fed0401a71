"""Issue 17, resource bounds and the one error boundary: context, threads and memory are bounded at
export and load; chat templates stop on time, work and size; edge-run reads long prompts from a file
or stdin and checks --trace before generating; every CLI ends a failure in one line."""

from __future__ import annotations

import errno
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edge.budget as budget
from edge.budget import MemoryEstimate, ResourceError, check_memory, estimate_for
from edge.cli_errors import EXIT_INTERRUPTED, UsageError, cli_boundary, describe
from edge.errors import BundleError, EdgeError, PromptError
from edge.export.cli import main as export_main
from edge.runtime import Model
from edge.runtime.cli import main as run_cli
from edge.runtime.eval_cli import main as eval_cli
from edge.runtime.template_sandbox import TemplateLimitError, compile_template
from edge.runtime.tokenizer import Tokenizer
from reliability_helpers import error_line, run_main, tree

REPO = Path(__file__).resolve().parent.parent
TOO_MANY = budget.max_threads() + 1


@pytest.fixture(scope="module")
def bundle(zoo):
    return zoo.bundle("llama", chunk=16, context=64)


@pytest.fixture(scope="module")
def model(zoo):
    return zoo.model("llama", chunk=16, context=64)


# ---------------------------------------------------------------- context and memory


@pytest.mark.parametrize("context, status, words", [
    ("10000000", 2, ["argument --context", "<= 131072", "10000000"]),  # the case: 8.2 GB export
    ("131073", 2, ["argument --context", "<= 131072"]),
    ("0", 2, ["argument --context", ">= 1"]),
    ("-5", 2, ["argument --context"]),
    ("1024", 1, ["--context", "at most 512", "max_position_embeddings"]),  # the tiny model's trained length
])
def test_export_context_bounds(capsys, zoo, tmp_path, context, status, words):
    before = tree(tmp_path)
    args = [zoo.folder("llama"), "-o", tmp_path / "out", "--quant", "fp32", "--quiet", "--chunk", "16",
            "--context", context]
    rc, _, err = run_main(export_main, args, capsys)
    error_line(err, "edge-export", status, rc, *words)
    assert tree(tmp_path) == before


def test_manifest_context_far_beyond_memory_is_refused_at_load(zoo, tmp_path, monkeypatch):
    """The runtime used to die allocating 215 GiB: now the estimate is refused with its numbers."""
    b = zoo.copy_bundle(tmp_path, context=64)
    path = b / "manifest.json"
    d = json.loads(path.read_text())
    # a fused-plan bundle (its cache has a dynamic length; the CPU plan's graph holds a static one,
    # which the manifest check would refuse first, naming the mismatch)
    d["plans"] = {k: v for k, v in d["plans"].items() if k != "cpu"} | {"default": "fused"}
    path.write_text(json.dumps({**d, "max_context": 131072}))
    monkeypatch.setattr(budget, "mem_available", lambda *a: 64 << 20)  # 64 MiB left
    with pytest.raises(ResourceError) as e:
        Model.load(b)
    msg = str(e.value)
    for w in ("needs about", "KV cache 64 MiB at context 131072", "only 64 MiB is available", "MemAvailable",
              "--context"):
        assert w in msg, (w, msg)
    monkeypatch.setenv("EDGE_MEMORY_CHECK", "off")
    Model.load(b)  # skipped on purpose


def test_memory_check_is_skipped_with_a_note_where_meminfo_is_missing(bundle, tmp_path, monkeypatch, caplog):
    assert budget.mem_available(str(tmp_path / "no-meminfo")) is None
    monkeypatch.setattr(budget, "mem_available", lambda *a: None)
    note = check_memory(MemoryEstimate(10, 10, 10, 64), "bundle")
    assert "memory check skipped" in note and "MemAvailable" in note
    with caplog.at_level("WARNING", logger="edge"):
        Model.load(bundle)
    assert any("memory check skipped" in r.getMessage() for r in caplog.records)


def test_memory_estimate_of_a_huge_context(model):
    need = estimate_for(model.config, 10_000_000, 128, 100 << 20)
    assert need.kv_cache == 2 * 2 * 10_000_000 * 2 * 16 * 4 and need.total > 40 << 30
    with pytest.raises(ResourceError, match=r"needs about 4\d\.\d GiB .* only 8,192 MiB is available"):
        check_memory(need, "bundle", available=8 << 30)
    assert check_memory(need, "bundle", refuse=False, available=8 << 30).startswith("warning: ")


def test_export_warns_when_the_bundle_needs_more_than_is_here(capfd, zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(budget, "mem_available", lambda *a: 1 << 10)
    rc, _, err = run_main(export_main, [zoo.folder("llama"), "-o", tmp_path / "b", "--chunk", "16", "--context",
                                        "64", "--quant", "fp32"], capfd)
    assert rc == 0, err  # the bundle may be for a bigger machine: a warning with the numbers, not a refusal
    assert "warning: bundle b: needs about" in err and "1 KiB is available" in err


def test_cli_refuses_a_bundle_too_big_for_this_machine_in_one_line(capsys, bundle, monkeypatch):
    monkeypatch.setattr(budget, "mem_available", lambda *a: 1 << 10)
    rc, out, err = run_main(run_cli, [bundle, "--prompt", "hi"], capsys)
    error_line(err, "edge-run", 1, rc, "needs about", "available")
    assert out == ""


# ---------------------------------------------------------------- threads


@pytest.mark.parametrize("argv, prog, main", [
    (["--threads", str(TOO_MANY)], "edge-run", run_cli),
    (["--threads", "100000"], "edge-run", run_cli),
    (["--threads", "-1"], "edge-run", run_cli),
    (["--lane-threads", "0", "--plan", "split"], "edge-run", run_cli),
    (["--lane-threads", "100000", "--plan", "split"], "edge-run", run_cli),
    (["--threads", "-2", "--perplexity"], "edge-eval", eval_cli),
    (["--threads", "100000", "--perplexity"], "edge-eval", eval_cli),
])
def test_thread_flags_are_bounded(capsys, bundle, argv, prog, main):
    extra = ["--prompt", "hi"] if prog == "edge-run" else []
    rc, out, err = run_main(main, [bundle, *extra, *argv], capsys)
    error_line(err, prog, 2, rc, f"argument {argv[0]}", "expected an integer")
    assert out == ""


def test_bench_threads_are_bounded(capsys, bundle):
    from edge.bench.cli import main

    for value in ("0", "100000"):
        rc, _, err = run_main(main, [bundle, "--threads", value], capsys)
        error_line(err, "edge-bench", 2, rc, "argument --threads")


@pytest.mark.parametrize("kw", [dict(threads=100000), dict(threads=-1), dict(threads=2.5),
                                dict(plan="split", lane_threads=0), dict(plan="split", lane_threads=10**6)])
def test_thread_counts_are_bounded_in_the_api(bundle, kw):
    with pytest.raises(ResourceError, match=r"threads: expected an integer from [01] to \d+"):
        Model.load(bundle, **kw)


# ---------------------------------------------------------------- chat templates


HOSTILE = {
    "nested loops": "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}",
    "nested output": "{% for a in range(99999) %}{% for b in range(99999) %}{{ a }}{% endfor %}{% endfor %}",
    "loops over messages": "{% for a in messages * 50000 %}{% for b in messages * 50000 %}x{% endfor %}{% endfor %}",
    "in a macro": "{% macro f() %}{% for a in range(99999) %}{% for b in range(99999) %}abcdefgh{% endfor %}"
                  "{% endfor %}{% endmacro %}{{ f() }}",
    "in a set block": "{% set x %}{% for a in range(99999) %}{% for b in range(999) %}abcdefgh{% endfor %}"
                      "{% endfor %}{% endset %}{{ x | length }}",
    "doubling": '{% set ns = namespace(s="x") %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}',
    "doubling +": '{% set ns = namespace(s="x") %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}',
    "repeat": '{{ "x" * 10000000000 }}',
    "list repeat": '{{ (messages * 1000000000) | length }}',
    "power": "{{ 9 ** 999999999 }}",
    "squaring": "{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "padding filter": '{{ "x" | center(1000000000) }}',
    "padding method": '{{ "x".ljust(1000000000) }}',
    "format width": '{{ "%999999999d" % 1 }}',
    "format method": '{{ "{:>999999999}".format(1) }}',
    "replace": '{{ ("x" * 100000).replace("", "0123456789") }}',
    "join": '{% set s = "x" * 1000000 %}{{ ([s] * 100000) | join }}',
    "recursion": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "branching recursion": "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    "recursive loop": "{% for x in [[1]] * 3 recursive %}{{ loop([x]) }}{% endfor %}",
    "huge range": "{{ range(10**12) | list | length }}",
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_chat_template_stops(bundle, case):
    tok = Tokenizer(bundle / "tokenizer.json", HOSTILE[case])
    t0 = time.monotonic()
    with pytest.raises(PromptError, match="chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < budget_seconds() + 3


def budget_seconds() -> float:
    from edge.runtime import template_sandbox

    return template_sandbox.TIME_LIMIT_S


def test_a_hostile_template_in_a_bundle_ends_edge_run_in_one_line(capsys, zoo, tmp_path):
    b = zoo.copy_bundle(tmp_path, context=64)
    path = b / "manifest.json"
    data = json.loads(path.read_text())
    data["tokenizer"]["chat_template"] = HOSTILE["nested output"]
    path.write_text(json.dumps(data))
    t0 = time.monotonic()
    rc, out, err = run_main(run_cli, [b, "--prompt", "hi"], capsys)
    error_line(err, "edge-run", 1, rc, "chat template", "stopped after")
    assert time.monotonic() - t0 < 30 and out == ""


def test_a_template_may_grow_with_the_conversation(bundle):
    """The size bound is relative to the messages: a long prompt through an ordinary template fits."""
    from tiny_models import CHAT_TEMPLATE

    tok = Tokenizer(bundle / "tokenizer.json", CHAT_TEMPLATE)
    text = "lorem ipsum " * 400_000  # 4.8 MB
    assert len(tok.apply_chat_template([{"role": "user", "content": text}])) > len(text)


def test_ordinary_templates_render_as_before():
    src = ("{% for m in messages %}{% if loop.first %}[{{ loop.length }}]{% endif %}{{ m['role'] | upper }}: "
           "{{ m['content'] | trim }}{{ ' | ' if not loop.last }}{% endfor %}{% set ns = namespace(n=0) %}"
           "{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %} n={{ ns.n }} {{ '%05d' % 7 }} "
           "{{ '{}-{}'.format('a', 'b') }} {{ 'a,b' .split(',') | join('+') }} {{ [3, 1, 2] | sort | list }}")
    messages = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "yo"}]
    import jinja2.sandbox

    plain = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(src)
    assert compile_template(src).render(messages=messages) == plain.render(messages=messages)


def test_template_limits_apply_per_render_and_per_thread():
    from concurrent.futures import ThreadPoolExecutor

    ok = compile_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    bad = compile_template(HOSTILE["nested loops"])
    msgs = [{"role": "user", "content": "x" * 1000}]

    def run(i):
        if i % 2:
            with pytest.raises(TemplateLimitError):
                bad.render(messages=msgs)
            return None
        return ok.render(messages=msgs)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(8)))
    assert results[0::2] == ["x" * 1000] * 4
    for _ in range(3):  # a budget does not carry over between renders
        assert ok.render(messages=msgs) == "x" * 1000


# ---------------------------------------------------------------- edge-eval, decode_step


@pytest.mark.parametrize("argv, words", [
    (["--tokens", "0"], ["argument --tokens", ">= 1, got 0"]),
    (["--tokens", "-3"], ["argument --tokens"]),
    (["--window", "0"], ["argument --window", ">= 2", "got 0"]),  # used to mean 1024 silently
    (["--window", "1"], ["argument --window", ">= 2"]),
    (["--window", "x"], ["argument --window", "expected an integer"]),
])
def test_eval_bounds(capsys, bundle, argv, words):
    rc, out, err = run_main(eval_cli, [bundle, "--perplexity", *argv], capsys)
    error_line(err, "edge-eval", 2, rc, *words)
    assert out == ""


def test_perplexity_api_bounds(model):
    from edge.runtime.perplexity import bundle_perplexity

    with pytest.raises(PromptError, match="tokens: expected an integer >= 1"):
        bundle_perplexity(model, "hello world " * 50, tokens=0)
    with pytest.raises(PromptError, match="window must be >= 2"):
        bundle_perplexity(model, "hello world " * 50, tokens=10, window=0)


@pytest.mark.parametrize("token", [300, -1, 10**12, 2.5, True, "5"])
def test_decode_step_validates_its_token_like_embed(model, token):
    cache = model.new_cache()
    model.prefill(model.embed([5, 6, 7]), cache)
    with pytest.raises(PromptError, match=r"token id must be an integer in \[0, 300\)"):
        model.decode_step(token, cache)
    assert cache.length == 3  # nothing written


# ---------------------------------------------------------------- prompt input, --trace


def test_prompt_file_and_stdin_give_the_prompts_answer(capsys, bundle, tmp_path):
    common = ["--max-new-tokens", "6"]
    rc, expected, err = run_main(run_cli, [bundle, "--prompt", "hello there", *common], capsys)
    assert rc == 0, err
    f = tmp_path / "prompt.txt"
    f.write_text("hello there\n", encoding="utf-8")
    rc, out, err = run_main(run_cli, [bundle, "--prompt-file", f, *common], capsys)
    assert rc == 0 and out == expected, err
    r = subprocess.run([sys.executable, "-m", "edge.runtime.cli", str(bundle), "--prompt", "-", *common],
                       input=b"hello there\n", capture_output=True, cwd=REPO, timeout=120,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.decode() == expected, r.stderr


def test_a_prompt_beyond_the_argument_limit_is_read_from_a_file(capsys, bundle, tmp_path):
    """> 128 KiB cannot go on a command line; from a file it arrives (and is judged by its length)."""
    f = tmp_path / "long.txt"
    f.write_text("word " * 60_000, encoding="utf-8")  # 300 kB
    rc, out, err = run_main(run_cli, [bundle, "--prompt-file", f], capsys)
    error_line(err, "edge-run", 1, rc, "prompt of 300000 characters cannot fit", "context of 64 tokens")


@pytest.mark.parametrize("make, status, words", [
    (lambda d: d / "missing.txt", 1, ["--prompt-file", "missing.txt", "cannot read"]),
    (lambda d: d, 1, ["--prompt-file", "is a folder"]),
    (lambda d: (d / "bad.txt").write_bytes(b"caf\xe9 \xff") and d / "bad.txt", 1,
     ["bad.txt", "not valid UTF-8", "byte 0xe9 at offset 3"]),
])
def test_prompt_file_problems(capsys, bundle, tmp_path, make, status, words):
    rc, out, err = run_main(run_cli, [bundle, "--prompt-file", make(tmp_path)], capsys)
    error_line(err, "edge-run", status, rc, *words)
    assert out == ""


def test_prompt_and_prompt_file_together_is_a_usage_error(capsys, bundle, tmp_path):
    (tmp_path / "p.txt").write_text("x")
    rc, _, err = run_main(run_cli, [bundle, "--prompt", "x", "--prompt-file", tmp_path / "p.txt"], capsys)
    error_line(err, "edge-run", 2, rc, "--prompt and --prompt-file")


def test_stdin_that_is_not_utf8():
    from edge.runtime.prompt_input import read_prompt

    with pytest.raises(PromptError, match=r"standard input\): not valid UTF-8 \(byte 0xff at offset 2\)"):
        read_prompt("-", None, io.BytesIO(b"hi\xff"))
    assert read_prompt("-", None, io.BytesIO("\ufeffhé\r\n".encode())) == "hé"


@pytest.mark.parametrize("flag", ["--trace", "--gantt"])
@pytest.mark.parametrize("where", ["missing folder", "a folder", "under a file"])
def test_unwritable_trace_is_refused_before_generating(capsys, bundle, tmp_path, monkeypatch, flag, where):
    """The issue's case: the error came after the whole generation."""
    (tmp_path / "file").write_text("mine")
    target = {"missing folder": tmp_path / "no" / "t.json", "a folder": tmp_path,
              "under a file": tmp_path / "file" / "t.json"}[where]
    monkeypatch.setattr(Model, "load", lambda *a, **k: pytest.fail("loaded the model before checking " + flag))
    before = tree(tmp_path)
    rc, out, err = run_main(run_cli, [bundle, "--prompt", "hi", flag, target], capsys)
    error_line(err, "edge-run", 1, rc, flag, str(target))
    assert out == "" and tree(tmp_path) == before


def test_bench_output_paths_are_checked_before_measuring(capsys, bundle, tmp_path, monkeypatch):
    import edge.bench.run as bench_run
    from edge.bench.cli import main

    (tmp_path / "file").write_text("mine")
    monkeypatch.setattr(bench_run, "run_bench", lambda *a, **k: pytest.fail("measured first"))
    rc, _, err = run_main(main, [bundle, "--json", tmp_path / "file" / "r.json"], capsys)
    error_line(err, "edge-bench", 1, rc, "--json", "r.json", "cannot create its folder")


# ---------------------------------------------------------------- the error boundary itself


def boundary(exc: BaseException):
    @cli_boundary("edge-test")
    def main(argv=None):
        raise exc

    return main


@pytest.mark.parametrize("exc, status, words", [
    (EdgeError("bundle/manifest.json: x: expected 1, got 2"), 1, ["bundle/manifest.json: x: expected 1, got 2"]),
    (UsageError("--a and --b: give one"), 2, ["--a and --b"]),
    (OSError(errno.ENOSPC, "No space left on device", "out/weights.bin"), 1,
     ["out/weights.bin: No space left on device [ENOSPC] (the file system is full)"]),
    (OSError(errno.EROFS, "Read-only file system", "out"), 1, ["out: Read-only file system", "read-only"]),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 1, ["/root/x: Permission denied"]),
    (KeyboardInterrupt(), EXIT_INTERRUPTED, ["interrupted (Ctrl-C)"]),
    (ValueError("bad value\nsecond line"), 1, ["bad value; second line"]),
    (MemoryError(), 1, ["out of memory"]),
    (RecursionError("maximum recursion depth exceeded"), 1, ["maximum recursion depth"]),
    (TypeError("'NoneType' object is not subscriptable"), 1, ["internal error", "TypeError", "--debug"]),
    (BrokenPipeError(errno.EPIPE, "Broken pipe"), 1, ["Broken pipe"]),
])
def test_every_failure_is_one_line(capsys, exc, status, words, monkeypatch):
    monkeypatch.delenv("EDGE_DEBUG", raising=False)
    if isinstance(exc, BrokenPipeError):  # the boundary points stdout at /dev/null: give it a spare one
        import os
        monkeypatch.setattr(sys, "stdout", open(os.devnull, "w"))
    rc, _, err = run_main(boundary(exc), [], capsys)
    error_line(err, "edge-test", status, rc, *words)


def test_debug_flag_and_variable_show_the_traceback(capsys, monkeypatch):
    rc, _, err = run_main(boundary(EdgeError("nope")), ["--debug"], capsys)
    assert rc == 1 and "Traceback" in err and err.splitlines()[-1] == "edge-test: error: nope"
    monkeypatch.setenv("EDGE_DEBUG", "1")
    rc, _, err = run_main(boundary(EdgeError("nope")), [], capsys)
    assert "Traceback" in err


def test_ctrl_c_while_generating(capsys, bundle, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(Model, "generate_ids", interrupted)
    rc, _, err = run_main(run_cli, [bundle, "--prompt", "hi"], capsys)
    error_line(err, "edge-run", 130, rc, "interrupted")


def test_a_long_library_message_is_one_bounded_line():
    msg, status = describe(BundleError("x" * 10_000 + "\n\n  tail"))
    assert status == 1 and "\n" not in msg and len(msg) <= 2000
