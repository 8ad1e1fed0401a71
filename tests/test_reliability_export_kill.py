"""Crash-safe export: edge-export SIGKILLed at any moment leaves the previous bundle (complete,
verified) or nothing at the target, never a mix; re-running succeeds and removes stale folders.

The export process is really killed (SIGKILL, no handler runs). tests/reliability_export_child.py
numbers every file-system step of an export; one sweep kills a fresh export at each step in turn,
another test kills `edge-export` from the parent at random moments of its write phase.

Concurrent exports to the same target (real processes, held at chosen steps): one export's cleanup
never removes another live export's folders, swaps never interleave, the last swap wins with a
complete bundle, and stale folders of killed exports are removed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.errors import BundleError
from edge.manifest import MANIFEST_NAME
from edge.runtime.bundle import open_bundle

REPO = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).with_name("reliability_export_child.py")
PREVIOUS = dict(chunk=16, context=64)  # the bundle already at the target
NEW = dict(chunk=8, context=64)  # what the killed export writes (different graphs and files)


def child_env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore", **extra}


def cli_args(folder: Path, out: str, opts: dict = NEW) -> list[str]:
    return [str(folder), "-o", out, "--chunk", str(opts["chunk"]), "--context", str(opts["context"]),
            "--quant", "fp32", "--quiet"]


@pytest.fixture(scope="module")
def versions(zoo):
    """(source folder, previous bundle, files of the previous and of the new bundle)."""
    prev = zoo.bundle("llama", **PREVIOUS)
    new = zoo.bundle("llama", **NEW)
    return zoo.folder("llama"), prev, open_bundle(prev).manifest.files, open_bundle(new).manifest.files


def state_of(target: Path, prev_files: dict, new_files: dict) -> str:
    """'previous' | 'new' | 'nothing'; fails the test on anything else (a mix, a corrupt bundle)."""
    if not target.exists():
        return "nothing"
    try:
        files = open_bundle(target).manifest.files  # manifest valid, every file present, sizes + sha256
    except BundleError as e:
        pytest.fail(f"{target}: neither the previous bundle nor nothing: {e}")
    on_disk = {p.name for p in target.iterdir()}
    assert on_disk == set(files) | {MANIFEST_NAME}, f"{target}: stray or missing files {on_disk ^ set(files)}"
    if files == prev_files:
        return "previous"
    assert files == new_files, f"{target}: a complete bundle, but neither the previous nor the new one"
    return "new"


def stale(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".bundle.tmp-", ".bundle.old-")))


def rerun_cli(folder: Path, target: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "edge.export.cli", *cli_args(folder, str(target))], cwd=REPO,
                       env=child_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_export_killed_at_every_step(versions, tmp_path):
    folder, prev, prev_files, new_files = versions
    root = tmp_path / "cases"
    r = subprocess.run([sys.executable, str(CHILD), "sweep", str(prev), str(root), *cli_args(folder, "{out}")],
                       cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    outcomes = json.loads(r.stdout)
    *killed, finished = outcomes
    assert all(o["killed"] for o in killed) and not finished["killed"] and finished["exit"] == 0, outcomes[-3:]
    labels = [o["step"] for o in killed]
    # every kind of step was a kill point, including both renames of the swap
    for kind in ("mkdtemp", "write weights", "save graph", "write_text manifest.json", "fsync", "rename"):
        assert any(kind in s for s in labels), (kind, labels)

    states = {}
    for o in outcomes:
        case = Path(o["case"])
        states[o["n"]] = state_of(case / "bundle", prev_files, new_files)
    report = [(o["n"], o["step"], states[o["n"]]) for o in outcomes]
    # before the swap the previous bundle is intact, after it the new one; between the two renames
    # (target moved aside, new one not yet in) the target is empty, which the contract allows
    first_new = min(n for n, s in states.items() if s == "new")
    assert all(s == "new" for n, s in states.items() if n >= first_new), report
    assert all(s in ("previous", "nothing") for n, s in states.items() if n < first_new), report
    assert all("rename" in label for n, label, s in report if s == "nothing"), report
    assert states[1] == "previous" and states[len(outcomes)] == "new", report
    killed_with_stale = [o for o in killed if stale(Path(o["case"]))]
    assert killed_with_stale, "no kill point left a temporary folder behind: the sweep missed the write phase"

    # re-running succeeds from every kind of wreck and removes the stale folders
    picks = {killed_with_stale[0]["n"], killed_with_stale[len(killed_with_stale) // 2]["n"],
             killed_with_stale[-1]["n"], *(n for n, s in states.items() if s == "nothing")}
    for n in sorted(picks):
        case = root / str(n)
        rerun_cli(folder, case / "bundle")
        assert state_of(case / "bundle", prev_files, new_files) == "new"
        assert stale(case) == [], (n, states[n], stale(case))


def test_export_killed_by_parent_at_random_moments(versions, tmp_path):
    """`edge-export` (slowed by 10 ms per step) gets SIGKILL from the parent at random times."""
    folder, prev, prev_files, new_files = versions
    seed = int(os.environ.get("EDGE_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    target = tmp_path / "bundle"
    shutil.copytree(prev, target)
    seen = []
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, str(CHILD), "run", *cli_args(folder, str(target))], cwd=REPO,
                                env=child_env(EDGE_STEP_SLEEP="0.01"), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        first = proc.stdout.readline()  # the export reached its first write step
        assert first.startswith("STEP"), first
        delay = rng.uniform(0, 0.8)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        steps = [line.split(" ", 2)[2].strip() for line in proc.stdout.read().splitlines() if line.startswith("STEP")]
        proc.stdout.close()
        state = state_of(target, prev_files, new_files)
        seen.append((round(delay, 3), proc.returncode, steps[-1] if steps else first.strip(), state))
    assert all(s[1] in (-signal.SIGKILL, 0) for s in seen), (seed, seen)
    rerun_cli(folder, target)
    assert state_of(target, prev_files, new_files) == "new", (seed, seen)
    assert stale(tmp_path) == [], (seed, seen, stale(tmp_path))


# ---------------------------------------------------------------- concurrent exports to one target


def start_export(folder: Path, target: Path, opts: dict, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CHILD), "run", *cli_args(folder, str(target), opts)], cwd=REPO,
                            env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(proc: subprocess.Popen, text: str) -> str:
    """Read the child's steps until one contains ``text`` (the child may be held there)."""
    seen = []
    while True:
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=60)
            pytest.fail(f"export exited ({proc.returncode}) before step {text!r}; steps {seen[-5:]}; "
                        f"stderr {proc.stderr.read()[-2000:]}")
        seen.append(line.strip())
        if line.startswith("STEP") and text in line:
            return line.strip()


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]


def chunk_of(target: Path) -> int:
    """The chunk length of the complete bundle at ``target`` (fails the test on a mix or a corrupt one)."""
    try:
        manifest = open_bundle(target).manifest  # manifest valid, every file present, sizes + sha256
    except BundleError as e:
        pytest.fail(f"{target}: not one complete bundle: {e}")
    on_disk = {p.name for p in target.iterdir()}
    assert on_disk == set(manifest.files) | {MANIFEST_NAME}, f"{target}: stray or missing files"
    return manifest.chunk_length


def test_concurrent_export_leaves_the_other_exports_folder_alone(versions, tmp_path):
    """A second edge-export to the same target runs from start to end while the first is held in the
    middle of writing its temporary folder, and an export killed earlier left its folder behind: the
    second removes the dead export's folder but not the live one's; both succeed; the first swaps
    last and its bundle stays, complete."""
    folder, prev, _, _ = versions
    target = tmp_path / "bundle"
    shutil.copytree(prev, target)
    dead = start_export(folder, target, NEW, EDGE_STEP_PAUSE="after save graph", EDGE_STEP_GO=str(tmp_path / "never"))
    wait_for_step(dead, "after save graph")
    dead.kill()
    dead.communicate(timeout=60)
    leftover = stale(tmp_path)
    assert len(leftover) == 1 and leftover[0].startswith(".bundle.tmp-"), leftover

    go = tmp_path / "go-first"
    first = start_export(folder, target, NEW, EDGE_STEP_PAUSE="after save graph", EDGE_STEP_GO=str(go))
    wait_for_step(first, "after save graph")  # held with a half-written temporary folder
    live = [n for n in stale(tmp_path) if n not in leftover]
    assert len(live) == 1 and live[0].startswith(".bundle.tmp-"), live

    second = start_export(folder, target, PREVIOUS)
    finish(second)
    assert chunk_of(target) == PREVIOUS["chunk"]
    assert stale(tmp_path) == live, "the second export removed a live export's folder (or kept a dead one's)"

    go.touch()
    finish(first)
    assert chunk_of(target) == NEW["chunk"]  # the last swap wins
    assert stale(tmp_path) == []
    # temporary folders are named by their export's pid (+ a random suffix)
    assert leftover[0].startswith(f".bundle.tmp-{dead.pid}-") and live[0].startswith(f".bundle.tmp-{first.pid}-")


def test_concurrent_swaps_do_not_interleave(versions, tmp_path):
    """The first export is held in the middle of its swap (old bundle moved aside, new one not yet
    in); the second, ready to swap, waits for it instead of moving its bundle into the empty target
    (which would make the first one's rename fail); then both succeed, the second last."""
    folder, prev, _, _ = versions
    target = tmp_path / "bundle"
    shutil.copytree(prev, target)
    go = tmp_path / "go-first"
    first = start_export(folder, target, NEW, EDGE_STEP_PAUSE="after rename bundle -> bundle", EDGE_STEP_GO=str(go))
    wait_for_step(first, "after rename bundle -> bundle")
    assert not target.exists()  # between the two renames of the first export's swap

    second = start_export(folder, target, PREVIOUS)
    wait_for_step(second, "after fsync_dir .bundle.tmp-")  # its bundle is complete: next comes the swap
    time.sleep(1.5)
    assert second.poll() is None, f"the second export swapped during the first one's swap: {second.communicate()}"
    assert not target.exists() and len(stale(tmp_path)) == 3  # first's .tmp- and .old-, second's .tmp-

    go.touch()
    finish(first)
    finish(second)
    assert chunk_of(target) == PREVIOUS["chunk"]  # the second swapped last
    assert stale(tmp_path) == []


def test_rerun_removes_stale_folders_of_every_vintage(versions, tmp_path):
    """Leftovers of killed exports, named as this version and older ones name them (a live pid in
    the name does not make a folder live: only its owner's lock does), never stop a re-run."""
    folder, prev, prev_files, new_files = versions
    target = tmp_path / "bundle"
    shutil.copytree(prev, target)
    for name in (".bundle.tmp-k3j9x_2a", f".bundle.tmp-{os.getpid()}-abc123", ".bundle.old-q8w7e6r5"):
        shutil.copytree(prev, tmp_path / name / ("bundle" if ".old-" in name else "."), dirs_exist_ok=True)
    (tmp_path / ".bundle.tmp-1-empty").mkdir()
    assert len(stale(tmp_path)) == 4
    rerun_cli(folder, target)
    assert state_of(target, prev_files, new_files) == "new"
    assert stale(tmp_path) == []


@pytest.mark.parametrize("step", ["after save graph", "after rename bundle -> bundle"])
def test_sigterm_unwinds_the_export(versions, tmp_path, step):
    """SIGTERM (kill, a service manager, a CI timeout) mid-write or between the swap's two renames:
    the export unwinds like Ctrl-C, so the previous bundle is in place, complete, and no hidden
    working or swap folder stays behind (the default action would leave them for the next export)."""
    folder, prev, _, _ = versions
    target = tmp_path / "bundle"
    shutil.copytree(prev, target)
    proc = start_export(folder, target, NEW, EDGE_STEP_PAUSE=step, EDGE_STEP_GO=str(tmp_path / "never"))
    wait_for_step(proc, step)
    assert stale(tmp_path), "the export holds a working folder at this step"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "terminated (SIGTERM)" in err and "is unchanged" in err, err[-2000:]
    assert chunk_of(target) == PREVIOUS["chunk"] and stale(tmp_path) == []
