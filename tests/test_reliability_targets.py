"""Issue 17, "nothing lost": edge-export replaces only a folder it wrote and deletes only files it
wrote; a read-only or full file system and Ctrl-C end in one line with the old bundle intact.

Each case asserts the exit status, a one-line message naming the problem, no traceback, and that
no file was removed or changed (a snapshot of the whole test folder before and after)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edge.export.cli import main as export_main
from edge.export.target import MARKER, remove_bundle
from edge.manifest import MANIFEST_NAME
from edge.runtime import Model
from edge.runtime.bundle import open_bundle
from reliability_helpers import EXPORT_ARGS, error_line, run_main, tree

REPO = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).with_name("reliability_export_child.py")


def export(capsys, model, out, *extra) -> tuple[int, str]:
    rc, _, err = run_main(export_main, [model, "-o", out, *EXPORT_ARGS, *extra], capsys)
    return rc, err


def child_env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


@pytest.fixture
def source(zoo):
    return zoo.folder("llama")


@pytest.fixture
def bundle(zoo, tmp_path):
    """A bundle this edge exported, at tmp_path/bundle."""
    out = tmp_path / "bundle"
    shutil.copytree(zoo.bundle("llama", chunk=16, context=64), out)
    return out


# ---------------------------------------------------------------- folders edge did not write


def web_app(root: Path) -> Path:
    app = root / "site"
    (app / "src").mkdir(parents=True)
    (app / "manifest.json").write_text(json.dumps({"name": "My PWA", "start_url": "/", "icons": []}))
    (app / "index.html").write_text("<html>mine</html>")
    (app / "src" / "app.js").write_text("console.log('mine')")
    return app


def test_a_web_app_with_a_manifest_json_is_not_a_bundle(capsys, source, tmp_path):
    """The issue's case: a folder holding some other manifest.json was emptied (exit 0)."""
    app = web_app(tmp_path)
    before = tree(tmp_path)
    rc, err = export(capsys, source, app)
    error_line(err, "edge-export", 1, rc, str(app), "not an edge bundle", "format is not 'edge-bundle'",
               "index.html", "refusing to overwrite")
    assert tree(tmp_path) == before


def test_a_copied_edge_manifest_without_the_marker_is_not_enough(capsys, source, bundle, tmp_path):
    """An edge manifest.json dropped into a folder (no marker, not the exporter's) does not make the
    folder edge's."""
    folder = tmp_path / "docs"
    folder.mkdir()
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    data["exporter"] = {"name": "someone-else"}
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    (folder / "README.md").write_text("mine")
    before = tree(tmp_path)
    rc, err = export(capsys, source, folder)
    error_line(err, "edge-export", 1, rc, "not an edge bundle", MARKER)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("extra", ["notes.txt", "results/run1.json", ".hidden", "embed.onnx.bak"])
def test_a_bundle_holding_a_file_edge_did_not_write_is_refused(capsys, source, bundle, tmp_path, extra):
    (bundle / extra).parent.mkdir(parents=True, exist_ok=True)
    (bundle / extra).write_text("mine")
    before = tree(tmp_path)
    rc, err = export(capsys, source, bundle)
    error_line(err, "edge-export", 1, rc, "holds files edge did not write", extra.split("/")[0])
    assert tree(tmp_path) == before


def test_a_target_holding_the_source_folder_is_refused(capsys, zoo, bundle, tmp_path):
    """The issue's case: re-exporting over a bundle that holds the export's own source folder deleted it."""
    src = bundle / "model"
    shutil.copytree(zoo.folder("llama"), src)
    before = tree(tmp_path)
    rc, err = export(capsys, src, bundle)
    error_line(err, "edge-export", 1, rc, "contains the model being exported", str(src))
    assert tree(tmp_path) == before


@pytest.mark.parametrize("where", ["same", "parent"])
def test_a_target_that_is_or_holds_the_source_is_refused(capsys, zoo, tmp_path, where):
    src = tmp_path / "work" / "model"
    shutil.copytree(zoo.folder("llama"), src)
    out = src if where == "same" else src.parent
    before = tree(tmp_path)
    rc, err = export(capsys, src, out)
    error_line(err, "edge-export", 1, rc, "contains the model being exported")
    assert tree(tmp_path) == before


def test_a_gguf_inside_the_target_is_refused(capsys, bundle, tmp_path):
    from test_gguf import hf_weights, write_tiny

    gguf_file = write_tiny(bundle / "tiny.gguf", hf_weights(tied=True, bias=False))
    before = tree(tmp_path)
    rc, err = export(capsys, gguf_file, bundle)
    error_line(err, "edge-export", 1, rc, "contains the model being exported", "tiny.gguf")
    assert tree(tmp_path) == before


def test_a_symlinked_target_is_refused(capsys, source, bundle, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(bundle)
    before = tree(tmp_path)
    rc, err = export(capsys, source, link)
    error_line(err, "edge-export", 1, rc, "symbolic link")
    assert tree(tmp_path) == before


def test_a_target_that_is_a_file_is_refused(capsys, source, tmp_path):
    f = tmp_path / "out.bin"
    f.write_bytes(b"mine")
    rc, err = export(capsys, source, f)
    error_line(err, "edge-export", 1, rc, "not an edge bundle", "refusing to overwrite")
    assert f.read_bytes() == b"mine"


def test_the_refusal_comes_before_loading_the_model(capsys, tmp_path, monkeypatch):
    """Found at once, not after minutes of loading and calibrating."""
    import edge.export.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_source", lambda m: pytest.fail("the model was loaded first"))
    app = web_app(tmp_path)
    rc, err = export(capsys, "smollm2-135m", app)
    error_line(err, "edge-export", 1, rc, "not an edge bundle")


# ---------------------------------------------------------------- what edge wrote is replaced


def test_its_own_bundle_is_replaced_and_carries_the_marker(capsys, zoo, bundle, tmp_path):
    neighbours = tmp_path / "neighbour.txt"
    neighbours.write_text("next to the bundle")
    rc, err = export(capsys, zoo.folder("qwen2"), bundle)
    assert rc == 0, err
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    assert MARKER in manifest["files"] and (bundle / MARKER).read_text().startswith("edge-bundle 1\n")
    assert {p.name for p in bundle.iterdir()} == set(manifest["files"]) | {MANIFEST_NAME}
    assert Model.load(bundle).config.architecture == "Qwen2ForCausalLM"
    assert neighbours.read_text() == "next to the bundle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "neighbour.txt"]


def test_a_bundle_from_before_markers_is_still_replaced(capsys, zoo, bundle):
    """Written by an older edge: no marker, but a manifest from edge-export listing every file."""
    (bundle / MARKER).unlink()
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    del data["files"][MARKER]
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    rc, err = export(capsys, zoo.folder("qwen2"), bundle)
    assert rc == 0, err
    assert (bundle / MARKER).is_file()


def test_replacing_removes_only_listed_files(bundle):
    """The removal of a replaced bundle deletes what its manifest lists, never a whole tree: a file
    that appeared after the ownership check is kept (with the folder)."""
    (bundle / "appeared-meanwhile.txt").write_text("mine")
    kept = remove_bundle(bundle)
    assert kept == ["appeared-meanwhile.txt"]
    assert [p.name for p in bundle.iterdir()] == ["appeared-meanwhile.txt"]


def test_a_file_that_appears_during_the_swap_survives(zoo, bundle, tmp_path, monkeypatch, capsys):
    import edge.export.bundle_writer as bundle_writer
    from edge.config import ExportOptions
    from edge.export.pipeline import export_model
    from edge.progress import Progress

    real = bundle_writer.check_target
    calls = []

    def check(target, sources=()):
        calls.append(target)
        real(target, sources)
        if len(calls) == 2:  # the check under the swap lock passed; now a user writes a file
            (bundle / "late.txt").write_text("mine")

    monkeypatch.setattr(bundle_writer, "check_target", check)
    export_model(zoo.folder("qwen2"), bundle, ExportOptions(16, 64), Progress(enabled=False))
    assert Model.load(bundle).config.architecture == "Qwen2ForCausalLM"
    kept = list(tmp_path.glob(".bundle.old-*/bundle/late.txt"))
    assert len(kept) == 1 and kept[0].read_text() == "mine"
    assert "kept late.txt" in capsys.readouterr().err


def test_a_stale_looking_folder_of_someone_else_is_left_alone(capsys, source, bundle, tmp_path):
    """Only working folders edge made (marker inside, or nothing but bundle files) count as stale."""
    mine = tmp_path / ".bundle.tmp-mine"
    mine.mkdir()
    (mine / "diary.txt").write_text("mine")
    rc, err = export(capsys, source, bundle)
    assert rc == 0, err
    assert (mine / "diary.txt").read_text() == "mine"


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_bundle_permissions_follow_the_umask(capsys, source, tmp_path, mask):
    old = os.umask(mask)
    try:
        rc, err = export(capsys, source, tmp_path / "b")
    finally:
        os.umask(old)
    assert rc == 0, err
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((tmp_path / "b" / "weights.bin").stat().st_mode) == 0o666 & ~mask


# ---------------------------------------------------------------- file systems that refuse, Ctrl-C


def _namespace_ok() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_mount = pytest.mark.skipif(not _namespace_ok(), reason="needs `unshare -m` (a private mount namespace)")


def in_namespace(script: str) -> subprocess.CompletedProcess:
    """``script`` (sh) in a private mount namespace: its mounts vanish with it."""
    return subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=300)


def export_cmd(source: Path, out: str) -> str:
    return f"{sys.executable} -m edge.export.cli {source} -o {out} {' '.join(EXPORT_ARGS)}"


@needs_mount
def test_read_only_file_system(source, tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    r = in_namespace(f"mount -t tmpfs -o ro,size=1m tmpfs {mnt} && {export_cmd(source, f'{mnt}/bundle')}")
    error_line(r.stderr, "edge-export", 1, r.returncode, f"{mnt}/bundle", "read-only file system")


@needs_mount
def test_full_file_system_keeps_the_previous_bundle(source, bundle, tmp_path):
    size = sum(p.stat().st_size for p in bundle.iterdir())
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = in_namespace(f"mount -t tmpfs -o size={size * 3 // 2} tmpfs {mnt} && cp -a {bundle} {mnt}/bundle && "
                     f"{export_cmd(source, f'{mnt}/bundle')}; rc=$?; ls -A {mnt}; "
                     f"cd {mnt}/bundle && sha256sum $(ls -A) ; exit $rc")
    error_line(r.stderr, "edge-export", 1, r.returncode, f"{mnt}/bundle", "No space left on device",
               "unchanged")
    listing, *sums = r.stdout.splitlines()
    assert listing == "bundle", r.stdout  # no half-written working folder left
    got = {line.split()[1]: line.split()[0] for line in sums}
    assert got == {k: v for k, v in tree(bundle).items()}


def test_ctrl_c_during_export_keeps_the_previous_bundle(source, bundle, tmp_path):
    before = tree(tmp_path)
    proc = subprocess.Popen([sys.executable, str(CHILD), "run", str(source), "-o", str(bundle), *EXPORT_ARGS],
                            cwd=REPO, env=child_env(EDGE_STEP_PAUSE="after save graph",
                                                    EDGE_STEP_GO=str(tmp_path / "never")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while "after save graph" not in (line := proc.stdout.readline()):
        assert line, proc.communicate(timeout=60)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    error_line(err, "edge-export", 130, proc.returncode, "interrupted", str(bundle), "unchanged")
    assert tree(tmp_path) == before  # the old bundle, and no working folder left
    open_bundle(bundle)


def test_debug_shows_the_traceback(capsys, source, tmp_path):
    app = web_app(tmp_path)
    rc, _, err = run_main(export_main, [source, "-o", app, *EXPORT_ARGS, "--debug"], capsys)
    assert rc == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("edge-export: error: ")
