"""A board installs numpy, onnxruntime, tokenizers and jinja2 only: the runtime must load a bundle
and generate with the exporter's and the test suite's heavy dependencies unavailable."""

from __future__ import annotations

import json
import textwrap

BLOCKED = ("torch", "transformers", "optimum", "onnx", "onnxscript", "gguf", "safetensors",
           "edge.export", "edge.bench",  # the exporter and the benchmarks never ship to a board
           "starlette", "uvicorn", "openai")  # edge-serve's extra (edge[serve]) and its test client: optional
# third-party top-level modules a board may have (the base dependencies and what they pull in)
ALLOWED_THIRD_PARTY = {"numpy", "onnxruntime", "tokenizers", "jinja2", "markupsafe", "edge",
                       "cython_runtime"}  # a pseudo-module that Cython extensions (numpy) register

SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys

    AT_START = set(sys.modules)  # whatever the interpreter's site set-up imported (.pth files)
    BLOCKED = set(sys.argv[2].split(","))
    attempts = []

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                attempts.append(name)
                raise ImportError(f"{name} is blocked (not installed on a board)")
            return None

    sys.meta_path.insert(0, Block())
    for name in BLOCKED:  # the guard itself works
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"guard failed for {name}")
    attempts.clear()

    import edge, edge.config, edge.errors, edge.manifest, edge.progress
    import edge.runtime
    from edge.runtime import Model
    from edge.runtime.cli import main as run_main
    from edge.runtime.eval_cli import main as eval_main  # noqa: F401

    model = Model.load(sys.argv[1])
    out = {
        "raw": model.generate("hello world", max_new_tokens=8, raw=True),
        "chat": model.generate("hello world", max_new_tokens=8),
        "sampled": model.generate("hello world", max_new_tokens=8, temperature=1.0, seed=3, raw=True),
    }
    assert run_main([sys.argv[1], "--prompt", "hi", "--raw", "--max-new-tokens", "3"]) == 0
    # chat sessions need nothing more; edge-serve without its extra refuses in one line
    assert model.chat_session(system="s").send("hello world", max_new_tokens=4) is not None
    from edge.runtime.serve_cli import main as serve_main
    assert serve_main([sys.argv[1]]) == 1
    attempts = [a for a in attempts if a not in ("starlette", "uvicorn")]  # what serve_main tries, and refuses
    stdlib = set(sys.stdlib_module_names) | {"__main__", "_distutils_hack", "sitecustomize", "usercustomize"}
    new = {m.split(".")[0] for m in set(sys.modules) - AT_START}
    third = sorted(new - stdlib - {m for m in new if m.startswith("_")})
    print("RESULT " + json.dumps({"out": out, "attempts": attempts, "modules": third}))
""")


def test_runtime_runs_without_heavy_dependencies(zoo, tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    bundle = zoo.bundle("llama", 16)
    script = tmp_path / "board.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(bundle), ",".join(BLOCKED)], cwd=REPO,
                       capture_output=True, text=True, encoding="utf-8", timeout=120,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])

    model = zoo.model("llama", 16)
    assert result["out"] == {
        "raw": model.generate("hello world", max_new_tokens=8, raw=True),
        "chat": model.generate("hello world", max_new_tokens=8),
        "sampled": model.generate("hello world", max_new_tokens=8, temperature=1.0, seed=3, raw=True),
    }
    # nothing even tried to import a blocked module (not just: survived its absence)
    assert result["attempts"] == [], result["attempts"]
    unexpected = set(result["modules"]) - ALLOWED_THIRD_PARTY
    assert not unexpected, f"the runtime imported {sorted(unexpected)}; a board has only {sorted(ALLOWED_THIRD_PARTY)}"
