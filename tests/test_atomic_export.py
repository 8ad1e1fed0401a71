"""Bundles are written atomically: a failed or killed export never leaves a half bundle, and the
previous bundle at the target path survives anything short of a successful export."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

import edge.export.bundle_writer as bundle_writer
import edge.export.pipeline as pipeline
from edge.config import ExportOptions
from edge.progress import Progress
from edge.runtime import Model

OPTS = ExportOptions(chunk_length=16, max_context=64)
QUIET = Progress(enabled=False)


def export(zoo, name, out):
    return pipeline.export_model(zoo.folder(name), out, OPTS, QUIET)


def snapshot(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def leftovers(out) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_export_replaces_existing_bundle(zoo, tmp_path):
    out = tmp_path / "bundle"
    export(zoo, "llama", out)
    export(zoo, "qwen2", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == "Qwen2ForCausalLM"
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["files"], "manifest.json"])
    assert leftovers(out) == []
    assert Model.load(out).config.attention_bias


def test_export_refuses_a_bundle_holding_a_file_edge_did_not_write(zoo, tmp_path):
    """A file someone put into a bundle folder is not edge's to delete: the export is refused, naming it."""
    out = tmp_path / "bundle"
    export(zoo, "llama", out)
    (out / "my-notes.txt").write_text("mine")
    before = snapshot(out)
    with pytest.raises(FileExistsError, match="holds files edge did not write: my-notes.txt"):
        export(zoo, "qwen2", out)
    assert snapshot(out) == before and leftovers(out) == []


def test_export_into_empty_folder(zoo, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    export(zoo, "llama", out)
    Model.load(out)


@pytest.mark.parametrize("exc", (RuntimeError, KeyboardInterrupt))
def test_failed_export_keeps_previous_bundle(zoo, tmp_path, monkeypatch, exc):
    out = tmp_path / "bundle"
    export(zoo, "llama", out)
    before = snapshot(out)
    written = []

    def fail(path):  # called once every file but the manifest is in the temporary folder
        written.extend(sorted(p.name for p in path.parent.iterdir()))
        raise exc("disk on fire")

    monkeypatch.setattr(pipeline, "file_record", fail)
    with pytest.raises(exc, match="disk on fire"):
        export(zoo, "qwen2", out)
    assert {"weights.bin", "prefill.onnx", "decode.onnx"} <= set(written)  # it failed midway
    assert snapshot(out) == before
    assert leftovers(out) == []
    monkeypatch.undo()
    assert Model.load(out).config.architecture == "LlamaForCausalLM"


def test_failed_first_export_leaves_nothing(zoo, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    monkeypatch.setattr(pipeline, "file_record", lambda p: (_ for _ in ()).throw(OSError("no space left")))
    with pytest.raises(OSError, match="no space left"):
        export(zoo, "llama", out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_swap_restores_previous_bundle(zoo, tmp_path, monkeypatch):
    """The old bundle is moved aside before the new one moves in: if that second step fails, the
    old one must come back (not stay hidden in a folder that the next export deletes)."""
    out = tmp_path / "bundle"
    export(zoo, "llama", out)
    before = snapshot(out)
    real_rename = os.rename

    def rename(src, dst):
        if str(src).startswith(str(tmp_path / f".{out.name}.tmp-")):
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(bundle_writer.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        export(zoo, "qwen2", out)
    monkeypatch.undo()
    assert out.is_dir() and snapshot(out) == before
    assert leftovers(out) == []


def test_refuses_to_overwrite_a_folder_that_is_not_a_bundle(zoo, tmp_path):
    out = tmp_path / "my-documents"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not an edge bundle; refusing to overwrite"):
        export(zoo, "llama", out)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "precious"
    assert leftovers(out) == []


def test_refuses_to_overwrite_a_file(zoo, tmp_path):
    out = tmp_path / "a-file"
    out.write_text("data")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        export(zoo, "llama", out)
    assert out.read_text() == "data"


KILLED = textwrap.dedent("""
    import os, sys
    import edge.export.pipeline as pipeline
    from edge.config import ExportOptions
    from edge.progress import Progress

    def die(path):
        os._exit(9)  # as if killed: no cleanup, no exception handlers

    pipeline.file_record = die
    pipeline.export_model(sys.argv[1], sys.argv[2], ExportOptions(16, 64), Progress(enabled=False))
""")


def test_killed_export_keeps_previous_bundle_and_next_export_cleans_up(zoo, tmp_path):
    from conftest import REPO

    out = tmp_path / "bundle"
    export(zoo, "llama", out)
    before = snapshot(out)
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    r = subprocess.run([sys.executable, str(script), str(zoo.folder("qwen2")), str(out)], cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)},  # this checkout's edge, not an installed one
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    assert snapshot(out) == before
    stale = leftovers(out)
    assert len(stale) == 1 and stale[0].startswith(".bundle.tmp-")  # the half-written copy, hidden
    Model.load(out)
    export(zoo, "qwen2", out)
    assert leftovers(out) == []
    assert Model.load(out).config.architecture == "Qwen2ForCausalLM"
