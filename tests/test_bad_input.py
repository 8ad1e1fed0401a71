"""Bad input gets a clear error naming what is wrong: models to export, and bundles to load.

Each bundle mutation works on a private copy of a tiny bundle.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from edge.config import ExportOptions
from edge.errors import BundleError, EdgeError, ModelSourceError, UnsupportedModelError
from edge.progress import Progress
from edge.export.pipeline import export_model
from edge.runtime import Model

QUIET = Progress(enabled=False)


def export(src, out):
    return export_model(src, out, ExportOptions(chunk_length=16, max_context=64), QUIET)


def edit_manifest(bundle, change):
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def load_error(bundle, **kw) -> str:
    with pytest.raises(BundleError) as e:
        Model.load(bundle, **kw)
    return str(e.value)


# ---------------------------------------------------------------- models to export


def test_missing_model_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelSourceError) as e:
        export(missing, tmp_path / "out")
    msg = str(e.value)
    assert str(missing) in msg and "no such file or folder" in msg and "smollm2-135m" in msg  # lists aliases
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_lists_supported(zoo, tmp_path):
    folder = zoo.copy_folder(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as e:
        export(folder, tmp_path / "out")
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg and "supported" in msg
    assert "LlamaForCausalLM" in msg and "Qwen2ForCausalLM" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, words", [
    ("no_config", ["no config.json"]),
    ("no_architectures", ["architectures"]),
    ("no_weights", ["no model.safetensors"]),
    ("bad_weights", ["model.safetensors", "not a readable safetensors"]),
    ("no_tokenizer", ["tokenizer.json"]),
    ("bad_config_json", ["config.json", "JSON"]),
    ("rope_scaling", ["rope scaling", "yarn"]),
])
def test_broken_hf_folder(zoo, tmp_path, damage, words):
    folder = zoo.copy_folder(tmp_path)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if damage == "no_config":
        cfg_path.unlink()
    elif damage == "no_architectures":
        del cfg["architectures"]
        cfg_path.write_text(json.dumps(cfg))
    elif damage == "no_weights":
        (folder / "model.safetensors").unlink()
    elif damage == "bad_weights":
        (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    elif damage == "no_tokenizer":
        (folder / "tokenizer.json").unlink()
    elif damage == "bad_config_json":
        cfg_path.write_text("{not json")
    elif damage == "rope_scaling":
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
        cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelSourceError) as e:
        export(folder, tmp_path / "out")
    for w in words:
        assert w in str(e.value)


def test_model_file_of_unknown_kind(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"1234")
    with pytest.raises(ModelSourceError, match="Hugging Face folder.*gguf"):
        export(f, tmp_path / "out")


# ---------------------------------------------------------------- bundles


def test_missing_bundle(tmp_path):
    msg = load_error(tmp_path / "nothing-here")
    assert "nothing-here" in msg and "not a bundle folder" in msg


def test_missing_manifest(zoo, tmp_path):
    b = zoo.copy_bundle(tmp_path)
    (b / "manifest.json").unlink()
    msg = load_error(b)
    assert "manifest.json" in msg and "missing" in msg and "not an edge bundle" in msg


def test_manifest_not_json(zoo, tmp_path):
    b = zoo.copy_bundle(tmp_path)
    (b / "manifest.json").write_text("{")
    assert "not valid JSON" in load_error(b)


@pytest.mark.parametrize("name", ["weights.bin", "prefill.onnx", "decode.onnx", "tokenizer.json"])
def test_changed_file_fails_checksum(zoo, tmp_path, name):
    b = zoo.copy_bundle(tmp_path)
    path = b / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit changed
    path.write_bytes(bytes(data))
    msg = load_error(b)
    assert name in msg and "sha256" in msg and "changed or corrupt" in msg


def test_changed_weights_pass_without_hash_check(zoo, tmp_path):
    """--no-verify skips hashing (sizes are still checked): a board can trade safety for load time."""
    b = zoo.copy_bundle(tmp_path)
    data = bytearray((b / "weights.bin").read_bytes())
    data[-1] ^= 0x01
    (b / "weights.bin").write_bytes(bytes(data))
    Model.load(b, verify_hashes=False)
    with pytest.raises(BundleError, match="sha256"):
        Model.load(b)


@pytest.mark.parametrize("verify", (True, False))
def test_truncated_file(zoo, tmp_path, verify):
    b = zoo.copy_bundle(tmp_path)
    path = b / "weights.bin"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 64)
    msg = load_error(b, verify_hashes=verify)
    assert "weights.bin" in msg and f"size {size - 64} bytes" in msg and f"manifest says {size}" in msg
    assert "truncated" in msg


def test_missing_listed_file(zoo, tmp_path):
    b = zoo.copy_bundle(tmp_path)
    (b / "decode.onnx").unlink()
    msg = load_error(b)
    assert "decode.onnx" in msg and "missing" in msg


def test_newer_format_version(zoo, tmp_path):
    b = zoo.copy_bundle(tmp_path)
    edit_manifest(b, lambda d: d.update(format_version=99))
    msg = load_error(b)
    assert "format_version" in msg and "99" in msg and "newer" in msg and "upgrade" in msg


@pytest.mark.parametrize("version", (0, -1))
def test_bad_format_version(zoo, tmp_path, version):
    b = zoo.copy_bundle(tmp_path)
    edit_manifest(b, lambda d: d.update(format_version=version))
    assert "format_version" in load_error(b)


def test_foreign_manifest(zoo, tmp_path):
    b = zoo.copy_bundle(tmp_path)
    edit_manifest(b, lambda d: d.update(format="something-else"))
    msg = load_error(b)
    assert "something-else" in msg and "not an edge bundle" in msg


@pytest.mark.parametrize("change, words", [
    (lambda d: d.update(format_version="1"), ["format_version", "expected int", "str"]),
    (lambda d: d.update(chunk_length="16"), ["chunk_length", "expected int", "str"]),
    (lambda d: d.update(max_context=64.0), ["max_context", "expected int", "float"]),
    (lambda d: d.update(files=[]), ["files", "expected dict", "list"]),
    (lambda d: d["model"].update(hidden_size="64"), ["model.hidden_size", "expected int", "str"]),
    (lambda d: d["model"].update(tie_word_embeddings=1), ["model.tie_word_embeddings", "bool"]),
    (lambda d: d["model"].update(eos_token_ids=[2.5]), ["model.eos_token_ids", "list of integers"]),
    (lambda d: d["model"].pop("vocab_size"), ["model.vocab_size", "missing"]),
    (lambda d: d["files"]["weights.bin"].update(size="12"), ["weights.bin", "size", "expected int"]),
    (lambda d: d["files"]["weights.bin"].update(sha256="abc"), ["weights.bin", "sha256", "64 hex digits"]),
    (lambda d: d["graphs"]["prefill"].update(inputs={}), ["graphs.prefill", "inputs", "expected list"]),
    (lambda d: d["graphs"].pop("decode"), ["graphs.decode", "missing"]),
    (lambda d: d.update(chunk_length=128), ["chunk_length 128", "max_context 64"]),
    (lambda d: d["tokenizer"].update(chat_template=5), ["chat_template", "string"]),
])
def test_manifest_field_of_wrong_type(zoo, tmp_path, change, words):
    b = zoo.copy_bundle(tmp_path, context=64)
    edit_manifest(b, change)
    msg = load_error(b)
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("bad", ["../weights.bin", "/etc/passwd", "sub/../../x", "..", "C:\\x", "~/x"])
def test_file_names_leaving_the_bundle_are_refused(zoo, tmp_path, bad):
    b = zoo.copy_bundle(tmp_path)

    def change(d):
        d["files"][bad] = d["files"]["weights.bin"]

    edit_manifest(b, change)
    msg = load_error(b)
    assert "leaves the bundle folder" in msg and repr(bad) in msg


@pytest.mark.parametrize("where", ["graph", "tokenizer"])
def test_graph_and_tokenizer_paths_are_checked(zoo, tmp_path, where):
    b = zoo.copy_bundle(tmp_path)

    def change(d):
        if where == "graph":
            d["graphs"]["decode"]["file"] = "../decode.onnx"
        else:
            d["tokenizer"]["file"] = "/abs/tokenizer.json"

    edit_manifest(b, change)
    assert "leaves the bundle folder" in load_error(b)


def test_listed_symlink_pointing_outside_is_refused(zoo, tmp_path):
    b = zoo.copy_bundle(tmp_path)
    outside = tmp_path / "outside.bin"
    os.replace(b / "weights.bin", outside)
    os.symlink(outside, b / "weights.bin")
    msg = load_error(b)
    assert "weights.bin" in msg and "outside the bundle folder" in msg


def test_unlisted_graph_file(zoo, tmp_path):
    b = zoo.copy_bundle(tmp_path)
    edit_manifest(b, lambda d: d["files"].pop("prefill.onnx"))
    msg = load_error(b)
    assert "prefill.onnx" in msg and "not listed under files" in msg


@pytest.mark.parametrize("graph, plan, shape", [("prefill", "fused", ["rows_so_far", 2, 16]),
                                                ("cpu", "cpu", [1, 2, "rows_so_far", 16])])
def test_graph_io_differs_from_manifest(zoo, tmp_path, graph, plan, shape):
    b = zoo.copy_bundle(tmp_path)
    # an axis name the graph does not have (sizes that contradict the manifest's own numbers are
    # refused earlier, naming the field: tests/test_reliability_targets.py)
    edit_manifest(b, lambda d: next(t for t in d["graphs"][graph]["inputs"] if t["name"] == "past_key_0").update(
        shape=shape))
    msg = load_error(b, plan=plan)
    assert f"{graph}.onnx" in msg and "past_key_0" in msg and f"manifest says {shape}" in msg


def test_graph_file_not_onnx(zoo, tmp_path):
    """A graph replaced by garbage with a matching manifest record: onnxruntime's refusal is named."""
    from edge.manifest import file_record

    b = zoo.copy_bundle(tmp_path)
    (b / "decode.onnx").write_bytes(b"garbage" * 10)
    edit_manifest(b, lambda d: d["files"].update({"decode.onnx": file_record(b / "decode.onnx")}))
    msg = load_error(b)
    assert "decode.onnx" in msg  # named, whatever the reason (unparsable protobuf, onnxruntime refusal)


def test_every_refusal_is_an_edge_error():
    assert issubclass(BundleError, EdgeError) and issubclass(ModelSourceError, EdgeError)
    assert issubclass(UnsupportedModelError, ModelSourceError)
    assert re.match(r"\d+\.\d+", __import__("edge").__version__)
