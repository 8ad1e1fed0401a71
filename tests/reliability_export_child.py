"""edge-export with numbered "steps", for the kill-during-export tests (not a test module itself).

Every file-system operation of an export is a step (before and after each call): creating the
temporary folder, writing the weights, saving each graph, writing the tokenizer and manifest,
each fsync, each rename, each removal. Two modes:

``run CLI-ARGS...``
    Runs ``edge-export CLI-ARGS`` (``edge.export.cli.main``, what ``python -m edge.export.cli`` runs) and
    prints ``STEP n label`` on stdout at each step, sleeping ``EDGE_STEP_SLEEP`` seconds there, so
    a parent can SIGKILL it at chosen or random moments of the write phase. With
    ``EDGE_STEP_PAUSE=TEXT`` and ``EDGE_STEP_GO=PATH`` it stops at the first step whose label
    contains TEXT (after printing it) until PATH exists: a parent can hold one export at a chosen
    point while another runs (the concurrent-export tests).

``sweep PREVIOUS ROOT CLI-ARGS...``  (``{out}`` in CLI-ARGS = the target)
    Imports once, then for n = 1, 2, ...: copies the PREVIOUS bundle to ``ROOT/n/bundle``, forks,
    and the forked process runs the export onto that target and SIGKILLs itself at step n (after
    writing the step's label to ``ROOT/n/step``). Stops after the first run that finishes before
    its step n: every step has then been a kill point. Prints a JSON list of outcomes. fsync calls
    are kill points but not made (they matter for power loss, not for a killed process; they
    would make the sweep several times slower).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import time

STATE = {"n": 0, "kill_at": 0, "label_file": None, "sleep": 0.0, "print": False, "pause": None, "go": None}


def _step(label: str) -> None:
    STATE["n"] += 1
    n = STATE["n"]
    if STATE["print"]:
        print(f"STEP {n} {label}", flush=True)
    if n == STATE["kill_at"]:
        with open(STATE["label_file"], "w") as f:
            f.write(label)
        os.kill(os.getpid(), signal.SIGKILL)
    if STATE["pause"] and STATE["pause"] in label:
        STATE["pause"] = None  # once
        deadline = time.monotonic() + 120
        while not os.path.exists(STATE["go"]) and time.monotonic() < deadline:
            time.sleep(0.01)
    if STATE["sleep"]:
        time.sleep(STATE["sleep"])


def _hook(owner, attr: str, label: str, skip: bool = False) -> None:
    """Make each call of owner.attr two steps; ``skip``: count the steps but do not make the call."""
    original = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        what = label
        named = [a for a in args[:2] if isinstance(a, (str, os.PathLike))]
        if named:
            what += f" {os.path.basename(os.fspath(named[0]))}"
        if label == "rename" and len(args) > 1:
            what += f" -> {os.path.basename(os.fspath(args[1]))}"
        _step(f"before {what}")
        result = None if skip else original(*args, **kwargs)
        _step(f"after {what}")
        return result

    setattr(owner, attr, wrapper)


def install_hooks(real_fsync: bool = True) -> None:
    import onnx

    import edge.export.bundle_writer
    import edge.export.graph.builder

    _hook(tempfile, "mkdtemp", "mkdtemp")
    _hook(edge.export.graph.builder.WeightStore, "write", "write weights")
    _hook(onnx, "save_model", "save graph")
    _hook(pathlib.Path, "write_text", "write_text")
    # fsync guards against power loss, which a process kill is not (the kernel keeps what was
    # written): the sweep keeps fsyncs as kill points but skips the slow syscall itself
    _hook(os, "fsync", "fsync", skip=not real_fsync)
    _hook(edge.export.bundle_writer, "fsync_dir", "fsync_dir", skip=not real_fsync)
    _hook(os, "rename", "rename")
    _hook(shutil, "rmtree", "rmtree")


def _cli(argv: list[str]) -> int:
    from edge.export.cli import main

    return main(argv)


def sweep(previous: str, root: str, template: list[str]) -> list[dict]:
    import edge.export.cli  # noqa: F401  (import everything once, before forking)
    import edge.export.pipeline  # noqa: F401

    install_hooks(real_fsync=False)
    outcomes = []
    n = 0
    while True:
        n += 1
        case = pathlib.Path(root) / str(n)
        case.mkdir(parents=True)
        target = case / "bundle"
        shutil.copytree(previous, target)
        STATE.update(n=0, kill_at=n, label_file=str(case / "step"))
        pid = os.fork()
        if pid == 0:  # the export process to kill
            try:
                rc = _cli([a.replace("{out}", str(target)) for a in template])
            except BaseException:
                rc = 99
            os._exit(100 + rc)  # finished before step n
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        label = (case / "step").read_text() if killed else None
        outcomes.append({"n": n, "case": str(case), "killed": killed, "step": label,
                         "exit": None if killed else os.WEXITSTATUS(status) - 100})
        if not killed or n > 500:
            return outcomes


def main() -> int:
    # a user's Ctrl-C: a shell that started the test run in the background (nohup ... &) makes its
    # children ignore SIGINT, and Python then installs no KeyboardInterrupt handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    mode, *rest = sys.argv[1:]
    if mode == "run":
        STATE.update(sleep=float(os.environ.get("EDGE_STEP_SLEEP", "0")), print=True,
                     pause=os.environ.get("EDGE_STEP_PAUSE"), go=os.environ.get("EDGE_STEP_GO"))
        install_hooks()
        return _cli(rest)
    if mode == "sweep":
        previous, root, *template = rest
        print(json.dumps(sweep(previous, root, template)))
        return 0
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main())
