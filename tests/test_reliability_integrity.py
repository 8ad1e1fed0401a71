"""Bundle integrity on the board: every way a bundle can be damaged or crafted is refused before
anything runs, with a message naming the file and the field.

Covers: external-data references that leave the bundle (checked by the runtime itself, without the
``onnx`` package, and by onnxruntime), pickle-capable files, fields of the wrong type, unknown
format versions, ``..``/absolute names, and the size/presence checks that ``verify_hashes=False``
keeps.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edge.errors import BundleError
from edge.manifest import file_record, parse_manifest, read_manifest
from edge.runtime import Model
from edge.runtime.bundle import open_bundle
from edge.runtime.onnx_refs import external_data_refs

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(chunk=16, context=64)


def edit_manifest(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def refuse(bundle: Path, *words: str, **kw) -> str:
    with pytest.raises(BundleError) as e:
        Model.load(bundle, **kw)
    msg = str(e.value)
    for w in words:
        assert w in msg, (w, msg)
    return msg


def relocate_external_data(bundle: Path, graph: str, location: str, tensor_index: int = 0) -> str:
    """Point one tensor of ``graph`` at ``location`` and re-record the graph's size/hash, so only the
    reference is wrong (as in a crafted bundle). Returns the tensor's name."""
    path = bundle / graph
    model = onnx.load(str(path), load_external_data=False)
    t = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL][tensor_index]
    for e in t.external_data:
        if e.key == "location":
            e.value = location
    path.write_bytes(model.SerializeToString())
    edit_manifest(bundle, lambda d: d["files"].update({graph: file_record(path)}))
    return t.name


# ---------------------------------------------------------------- external data


def test_exporter_records_each_graphs_external_data(zoo):
    """The manifest says which files each graph reads; the runtime's own protobuf scan agrees."""
    bundle = zoo.bundle("llama", **SMALL)
    m = read_manifest(bundle)
    for key, g in m.graphs.items():
        refs = {loc for _, loc in external_data_refs(bundle / g.file)}
        assert g.external_data is not None, key
        assert set(g.external_data) == refs, key
    assert m.graphs["decode"].external_data == ("weights.bin",)


def test_external_data_scan_matches_onnx(zoo):
    """The minimal scanner finds exactly the tensors onnx itself reports as external."""
    bundle = zoo.bundle("llama", **SMALL)
    for name in ("embed.onnx", "prefill.onnx", "decode.onnx"):
        model = onnx.load(str(bundle / name), load_external_data=False)
        expected = [(t.name, {e.key: e.value for e in t.external_data}["location"])
                    for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
        assert sorted(external_data_refs(bundle / name)) == sorted(expected), name


@pytest.mark.parametrize("location, words", [
    ("../outside.bin", ["leaves the bundle folder"]),
    ("/etc/passwd", ["leaves the bundle folder"]),
    ("sub/../../outside.bin", ["leaves the bundle folder"]),
    ("extra.bin", ["not a file listed in the manifest"]),  # inside the folder, but unhashed
])
@pytest.mark.parametrize("verify_hashes", [True, False])
def test_graph_external_data_outside_the_bundle_is_refused(zoo, tmp_path, location, words, verify_hashes):
    bundle = zoo.copy_bundle(tmp_path, "llama", **SMALL)
    (tmp_path / "outside.bin").write_bytes(b"\0" * 4096)
    (bundle / "extra.bin").write_bytes(b"\0" * 4096)
    tensor = relocate_external_data(bundle, "decode.onnx", location)
    msg = refuse(bundle, "decode.onnx", repr(tensor), "external_data location", repr(location), *words,
                 verify_hashes=verify_hashes)
    assert "onnxruntime" not in msg  # refused by the runtime's own check, before onnxruntime opens it


def test_graph_reading_a_file_not_recorded_for_it_is_refused(zoo, tmp_path):
    """tokenizer.json is a listed, hashed file, but not one the decode graph is recorded to read."""
    bundle = zoo.copy_bundle(tmp_path, "llama", **SMALL)
    relocate_external_data(bundle, "decode.onnx", "tokenizer.json")
    refuse(bundle, "decode.onnx", "'tokenizer.json'", "graphs.decode.external_data")


@pytest.mark.parametrize("value, words", [
    (["../weights.bin"], ["graphs.decode.external_data[0]", "leaves the bundle folder"]),
    (["/abs/weights.bin"], ["graphs.decode.external_data[0]", "leaves the bundle folder"]),
    (["other.bin"], ["graphs.decode.external_data[0]", "not listed under files"]),
    ("weights.bin", ["graphs.decode.external_data", "expected list"]),
    ([7], ["graphs.decode.external_data[0]", "expected a file name"]),
])
def test_manifest_external_data_field_is_validated(zoo, tmp_path, value, words):
    bundle = zoo.copy_bundle(tmp_path, "llama", **SMALL)
    edit_manifest(bundle, lambda d: d["graphs"]["decode"].update(external_data=value))
    refuse(bundle, "manifest.json", *words)


def _crafted_graph(folder: Path, location: str) -> Path:
    t = TensorProto()
    t.name, t.data_type, t.data_location = "w", TensorProto.FLOAT, TensorProto.EXTERNAL
    t.dims.extend([4])
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        e = t.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=[t])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = folder / "crafted.onnx"
    path.write_bytes(m.SerializeToString())
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "inside"])
def test_onnxruntime_itself_refuses_escaping_external_data(tmp_path, kind):
    """Second line of defence (and documentation of the onnxruntime we run on): a crafted graph whose
    external data leaves its folder is refused by onnxruntime too; one inside it loads."""
    folder = tmp_path / "bundle"
    folder.mkdir()
    secret = np.arange(4, dtype=np.float32)
    secret.tofile(tmp_path / "outside.bin")
    secret.tofile(folder / "inside.bin")
    os.symlink(tmp_path / "outside.bin", folder / "link.bin")
    location = {"dotdot": "../outside.bin", "absolute": str(tmp_path / "outside.bin"),
                "symlink": "link.bin", "inside": "inside.bin"}[kind]
    path = _crafted_graph(folder, location)
    assert external_data_refs(path) == [("w", location)]
    if kind == "inside":
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(sess.run(None, {"x": np.zeros(4, np.float32)})[0], secret)
        return
    with pytest.raises(Exception, match="External data path") as e:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert "escapes" in str(e.value) or "Absolute path" in str(e.value)


def test_listed_file_that_is_a_symlink_out_of_the_bundle_is_refused(zoo, tmp_path):
    bundle = zoo.copy_bundle(tmp_path, "llama", **SMALL)
    outside = tmp_path / "weights-elsewhere.bin"
    (bundle / "weights.bin").rename(outside)
    os.symlink(outside, bundle / "weights.bin")
    refuse(bundle, "weights.bin", "resolves outside the bundle folder", verify_hashes=False)


@pytest.mark.parametrize("damage", [b"", b"\x0a\xff\xff\xff\xff\x0f", b"\x3a\x05abc", os.urandom(64)])
def test_scanner_refuses_malformed_graph_files(tmp_path, damage):
    path = tmp_path / "g.onnx"
    path.write_bytes(damage)
    try:
        refs = external_data_refs(path)
    except BundleError as e:
        assert "g.onnx" in str(e) and "cannot load this graph" in str(e)
    else:  # random bytes can happen to be a valid (meaningless) protobuf: then nothing is referenced
        assert isinstance(refs, list)


def test_truncated_graph_is_refused_even_with_a_matching_record(zoo, tmp_path):
    bundle = zoo.copy_bundle(tmp_path, "llama", **SMALL)
    path = bundle / "prefill.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    edit_manifest(bundle, lambda d: d["files"].update({"prefill.onnx": file_record(path)}))
    refuse(bundle, "prefill.onnx", "cannot load")


# ---------------------------------------------------------------- pickles


PICKLE_MODULES = {"pickle", "cPickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}


def test_runtime_and_core_never_unpickle():
    """No code a board runs (edge.runtime = runtime/, the core edge/) can unpickle: no pickle-family import, no np.load /
    numpy.load / torch.load call, no allow_pickle anywhere (checked on the syntax tree)."""
    offenders = []
    for pkg in ("runtime", "edge"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    offenders += [(path.name, a.name) for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
                elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
                    offenders.append((path.name, node.module))
                elif isinstance(node, ast.Attribute) and node.attr in ("load", "loads") and \
                        isinstance(node.value, ast.Name) and node.value.id in ("np", "numpy", "torch"):
                    offenders.append((path.name, f"{node.value.id}.{node.attr}"))
                elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                    offenders.append((path.name, "allow_pickle"))
    assert offenders == []


class _Bomb:
    """Unpickling this creates a marker file: proof that something unpickled it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["weights.npy", "model.pkl", "embed.npz", "weights.pt"])
def test_pickled_array_listed_in_the_manifest_is_refused(zoo, tmp_path, name):
    bundle = zoo.copy_bundle(tmp_path, "llama", **SMALL)
    marker = tmp_path / "unpickled"
    (bundle / name).write_bytes(pickle.dumps(_Bomb(str(marker))))
    edit_manifest(bundle, lambda d: d["files"].update({name: file_record(bundle / name)}))
    refuse(bundle, "manifest.json", "files", repr(name), "pickle")
    assert not marker.exists()


def test_stray_pickles_in_a_bundle_folder_are_never_opened(zoo, tmp_path):
    """Files the manifest does not list are ignored: a pickle dropped next to the graphs (even named
    like them) is never read while loading and generating."""
    bundle = zoo.copy_bundle(tmp_path, "llama", **SMALL)
    marker = tmp_path / "unpickled"
    bomb = pickle.dumps(_Bomb(str(marker)))
    np.save(bundle / "weights.npy", np.array([_Bomb(str(marker))], dtype=object), allow_pickle=True)
    for name in ("model.pkl", "tokenizer.pkl", "decode.onnx.pkl"):
        (bundle / name).write_bytes(bomb)
    model = Model.load(bundle)
    assert model.generate("hello", max_new_tokens=4) == zoo.model("llama", **SMALL).generate("hello", max_new_tokens=4)
    assert not marker.exists()


# ---------------------------------------------------------------- fields, versions, names


def _set(path: tuple, value):
    def change(d):
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return change


def _rename_file(old: str, new: str):
    def change(d):
        d["files"][new] = d["files"].pop(old)
        for g in d["graphs"].values():
            if g["file"] == old:
                g["file"] = new
    return change


@pytest.mark.parametrize("change, field, words", [
    (_set(("format_version",), "1"), "format_version", ["expected int"]),
    (_set(("format_version",), True), "format_version", ["expected int"]),
    (_set(("format_version",), 99), "format_version", ["newer than this runtime", "upgrade"]),
    (_set(("format_version",), 0), "format_version", ["expected 1.."]),
    (_set(("format",), "onnx-bundle"), "format", ["not an edge bundle"]),
    (_set(("files", "weights.bin", "size"), "123"), "files['weights.bin'].size", ["expected int"]),
    (_set(("files", "weights.bin", "size"), -1), "files['weights.bin'].size", [">= 0"]),
    (_set(("files", "weights.bin", "sha256"), 12), "files['weights.bin'].sha256", ["expected str"]),
    (_set(("files", "weights.bin", "sha256"), "xyz"), "files['weights.bin'].sha256", ["64 hex digits"]),
    (_set(("files", "weights.bin"), [1, 2]), "files['weights.bin']", ["expected an object"]),
    (_set(("graphs", "prefill", "inputs"), "inputs_embeds"), "graphs.prefill.inputs", ["expected list"]),
    (_set(("graphs", "prefill", "inputs", 0, "shape"), [1, -3]), "graphs.prefill.inputs[0].shape[1]", []),
    (_set(("graphs", "decode", "file"), None), "graphs.decode.file", ["expected str"]),
    (_set(("chunk_length",), 1.5), "chunk_length", ["expected int"]),
    (_set(("max_context",), 4), "chunk_length 16 / max_context 4", ["out of range"]),
    (_set(("model", "hidden_size"), "64"), "model.hidden_size", ["expected int"]),
    (_set(("model", "num_kv_heads"), 0), "model", ["num_kv_heads must be >= 1"]),
    (_set(("model", "rope_theta"), float("nan")), "model", ["rope_theta must be a finite number"]),
    (_set(("model", "eos_token_ids"), ["2"]), "model.eos_token_ids", ["list of integers"]),
    (_set(("tokenizer", "file"), 5), "tokenizer.file", ["expected str"]),
    (_set(("tokenizer", "chat_template"), ["x"]), "tokenizer.chat_template", ["string or null"]),
    (_set(("quantization",), "int8"), "quantization", ["expected dict"]),
    (_rename_file("decode.onnx", "../decode.onnx"), "files", ["'../decode.onnx'", "leaves the bundle folder"]),
    (_rename_file("decode.onnx", "/tmp/decode.onnx"), "files", ["'/tmp/decode.onnx'", "leaves the bundle folder"]),
    (_rename_file("decode.onnx", "a/../../decode.onnx"), "files", ["leaves the bundle folder"]),
    (_rename_file("decode.onnx", "C:\\decode.onnx"), "files", ["leaves the bundle folder"]),
    (_rename_file("decode.onnx", "dec\x00ode.onnx"), "files", ["control characters"]),
    (_set(("tokenizer", "file"), "../tokenizer.json"), "tokenizer.file", ["leaves the bundle folder"]),
    (_set(("graphs", "embed", "file"), "missing.onnx"), "graphs.embed.file", ["not listed under files"]),
])
def test_bad_manifest_field_is_refused_naming_file_and_field(zoo, tmp_path, change, field, words):
    bundle = zoo.copy_bundle(tmp_path, "llama", **SMALL)
    edit_manifest(bundle, change)
    refuse(bundle, str(bundle / "manifest.json"), field, *words)
    refuse(bundle, str(bundle / "manifest.json"), field, *words, verify_hashes=False)


def test_runaway_or_deeply_nested_manifest_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="manifest.json: not valid JSON"):
        read_manifest(tmp_path)
    with pytest.raises(BundleError, match="format"):
        parse_manifest({"format": ["edge-bundle"]})


# ---------------------------------------------------------------- hash skip keeps size/presence checks


@pytest.mark.parametrize("verify_hashes", [True, False])
@pytest.mark.parametrize("damage", ["truncate", "extend", "delete", "directory"])
def test_size_and_presence_are_checked_even_without_hashes(zoo, tmp_path, verify_hashes, damage):
    bundle = zoo.copy_bundle(tmp_path, "llama", **SMALL)
    path = bundle / "weights.bin"
    if damage == "truncate":
        os.truncate(path, path.stat().st_size - 1)
        words = ["weights.bin", "size", "truncated or changed"]
    elif damage == "extend":
        with open(path, "ab") as f:
            f.write(b"\0")
        words = ["weights.bin", "size", "truncated or changed"]
    elif damage == "delete":
        path.unlink()
        words = ["weights.bin", "missing"]
    else:
        path.unlink()
        path.mkdir()
        words = ["weights.bin", "missing"]
    refuse(bundle, *words, verify_hashes=verify_hashes)


def test_hash_skip_only_skips_the_hash(zoo, tmp_path):
    """Same size, one bit flipped in the tokenizer: loads without hashing, refused with it."""
    bundle = zoo.copy_bundle(tmp_path, "llama", **SMALL)
    path = bundle / "tokenizer.json"
    data = path.read_bytes()
    i = data.index(b'"version"') + 1
    path.write_bytes(data[:i] + b"V" + data[i + 1:])  # "version" -> "Version": still valid JSON
    open_bundle(bundle, verify_hashes=False)
    refuse(bundle, "tokenizer.json", "sha256")
