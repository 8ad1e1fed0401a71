"""Issue 17, "nothing raw": a model whose config, weights, tokenizer or GGUF metadata disagree is
refused at export (one line naming the file and field, exit 1, no bundle written), and a manifest
that disagrees with its own graphs is refused at load before anything runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge.errors import BundleError, ModelSourceError
from edge.export.cli import main as export_main
from edge.export.sources import load_source
from edge.runtime import Model
from edge.runtime.cli import main as run_main_cli
from reliability_helpers import EXPORT_ARGS, error_line, run_main, tree

gguf = pytest.importorskip("gguf")


def edit_config(folder: Path, change) -> Path:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data = change(data) or data
    path.write_text(json.dumps(data))
    return folder


def edit_weights(folder: Path, change) -> Path:
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    w = load_file(str(path))
    change(w)
    save_file(w, str(path))
    return folder


def refused_export(capsys, folder: Path, tmp_path: Path, *words: str) -> str:
    before = tree(tmp_path)
    out = tmp_path / "out"
    rc, _, err = run_main(export_main, [folder, "-o", out, *EXPORT_ARGS], capsys)
    line = error_line(err, "edge-export", 1, rc, *words)
    assert not out.exists() and tree(tmp_path) == before  # no bundle, no working folder, nothing changed
    return line


def setter(**kv):
    return lambda d: d.update(kv)


CONFIG_CASES = {
    # the issue's cases: the runtime later failed on a shape, or a layer was silently dropped
    "hidden_size": (setter(hidden_size=48), ["hidden_size 48", "wrong shape"]),
    "heads more": (setter(num_attention_heads=8), ["wrong shape", "q_proj", "num_attention_heads 8 x head_dim 16"]),
    "heads fewer": (setter(num_attention_heads=2), ["wrong shape", "num_attention_heads 2"]),
    "heads, no head_dim": (lambda d: (d.pop("head_dim"), d.update(num_attention_heads=8)) and None,
                           ["wrong shape", "head_dim 8"]),
    "vocab smaller": (setter(vocab_size=200), ["vocab_size"]),
    "vocab larger": (setter(vocab_size=400), ["vocab_size 400", "embed_tokens"]),
    "layers fewer": (setter(num_hidden_layers=1), ["num_hidden_layers is 1 but the weights hold 2 layers",
                                                   "model.layers.1."]),
    "layers more": (setter(num_hidden_layers=3), ["missing", "model.layers.2.", "weights hold 2 layers"]),
    "intermediate": (setter(intermediate_size=96), ["intermediate_size 96", "mlp"]),
    "head_dim": (setter(head_dim=8), ["wrong shape", "head_dim 8"]),
    # values that raised ZeroDivisionError / ValueError / AttributeError
    "list": (lambda d: [d], ["config.json", "expected a JSON object, got list"]),
    "heads 0": (setter(num_attention_heads=0), ["num_attention_heads: expected an integer >= 1, got int 0"]),
    "heads -4": (setter(num_attention_heads=-4), ["num_attention_heads: expected an integer >= 1"]),
    "kv 0": (setter(num_key_value_heads=0), ["num_key_value_heads: expected an integer >= 1"]),
    "kv 3": (setter(num_key_value_heads=3), ["num_key_value_heads: expected a divisor of num_attention_heads 4"]),
    "hidden str": (setter(hidden_size="64"), ["hidden_size: expected an integer >= 1, got str"]),
    "hidden float": (setter(hidden_size=64.5), ["hidden_size: expected an integer"]),
    "layers 0": (setter(num_hidden_layers=0), ["num_hidden_layers: expected an integer >= 1"]),
    "layers null": (lambda d: d.pop("num_hidden_layers") and None, ["num_hidden_layers: missing"]),
    "eps negative": (setter(rms_norm_eps=-1e-5), ["rms_norm_eps: expected a finite number > 0"]),
    "eps zero": (setter(rms_norm_eps=0), ["rms_norm_eps: expected a finite number > 0"]),
    "rope theta": (setter(rope_theta="big"), ["rope_theta: expected a finite number > 0"]),
    "hidden not multiple": (lambda d: (d.pop("head_dim"), d.update(num_attention_heads=5, num_key_value_heads=5))
                            and None,
                            ["hidden_size 64 is not a multiple of num_attention_heads 5"]),
    "eos out of range": (setter(eos_token_id=999), ["eos_token_id", "[0, 300)"]),
    "bos out of range": (setter(bos_token_id=300), ["bos_token_id", "[0, 300)"]),
    "eos negative": (setter(eos_token_id=-1), ["eos_token_id: expected token ids"]),
    "architectures str": (setter(architectures="LlamaForCausalLM"), ["architectures: expected a list"]),
    "rope scaling list": (setter(rope_scaling=[1, 2]), ["rope_scaling"]),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_disagreeing_with_itself_or_the_weights(capsys, zoo, tmp_path, case):
    change, words = CONFIG_CASES[case]
    folder = edit_config(zoo.copy_folder(tmp_path), change)
    refused_export(capsys, folder, tmp_path, *words)


def test_tensor_the_family_does_not_know_is_named(capsys, zoo, tmp_path):
    """A tensor the graphs would not use (a q/k norm, a bias the config does not declare) is named,
    not silently dropped."""
    folder = edit_weights(zoo.copy_folder(tmp_path), lambda w: w.update({
        "model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}))
    refused_export(capsys, folder, tmp_path, "model.layers.0.self_attn.q_norm.weight", "does not use")


def test_qwen2_weights_under_a_llama_config_are_refused(capsys, zoo, tmp_path):
    folder = zoo.copy_folder(tmp_path, "qwen2")
    edit_config(folder, setter(architectures=["LlamaForCausalLM"], model_type="llama"))
    refused_export(capsys, folder, tmp_path, "self_attn.q_proj.bias", "does not use")


@pytest.mark.parametrize("name, shape", [("model.norm.weight", (32,)), ("lm_head.weight", (300, 32)),
                                         ("model.layers.1.mlp.down_proj.weight", (64, 96))])
def test_a_weight_of_the_wrong_shape_is_named(capsys, zoo, tmp_path, name, shape):
    folder = edit_weights(zoo.copy_folder(tmp_path), lambda w: w.update({name: np.zeros(shape, np.float32)}))
    refused_export(capsys, folder, tmp_path, name, f"got {shape}")


def test_a_missing_weight_is_named(capsys, zoo, tmp_path):
    folder = edit_weights(zoo.copy_folder(tmp_path), lambda w: w.pop("model.layers.1.self_attn.v_proj.weight"))
    refused_export(capsys, folder, tmp_path, "missing", "model.layers.1.self_attn.v_proj.weight")


TOKENIZER_CASES = {
    "not a tokenizer": ('{"version": "1.0", "whatever": true}', ["tokenizer.json", "not a valid tokenizers JSON"]),
    "a list": ("[1, 2, 3]", ["tokenizer.json", "expected a JSON object, got list"]),
    "truncated": (None, ["tokenizer.json", "unreadable JSON"]),
}


@pytest.mark.parametrize("case", TOKENIZER_CASES)
def test_an_invalid_tokenizer_is_refused_at_export(capsys, zoo, tmp_path, case):
    """The issue's case: the export succeeded and the runtime refused the bundle."""
    text, words = TOKENIZER_CASES[case]
    folder = zoo.copy_folder(tmp_path)
    tok = folder / "tokenizer.json"
    tok.write_text(text if text is not None else tok.read_text()[:500])
    refused_export(capsys, folder, tmp_path, *words)


def test_a_tokenizer_larger_than_the_embedding_is_refused(capsys, zoo, tmp_path):
    folder = zoo.copy_folder(tmp_path)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["model"]["vocab"]["zz"] = 320  # a 320th+ token: its id has no row in a 300-row embedding
    (folder / "tokenizer.json").write_text(json.dumps(data))
    refused_export(capsys, folder, tmp_path, "tokenizer.json", "token ids up to 320", "vocab_size is 300",
                   "no embedding row")


def test_a_chat_template_that_never_finishes_is_refused_at_export(capsys, zoo, tmp_path):
    folder = zoo.copy_folder(tmp_path)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    refused_export(capsys, folder, tmp_path, "chat template", "stopped after")


# ---------------------------------------------------------------- sharded indexes


def shard(folder: Path, index) -> Path:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("index, words", [
    ([{"weight_map": {}}], ["model.safetensors.index.json", "expected a JSON object, got list"]),
    ({"weight_map": ["a", "b"]}, ["weight_map: expected an object"]),
    ({"metadata": {}}, ["weight_map: expected an object"]),
    ({"weight_map": {"model.norm.weight": "/etc/passwd"}}, ["weight_map", "inside the model folder", "/etc/passwd"]),
    ({"weight_map": {"model.norm.weight": "../other/model.safetensors"}}, ["inside the model folder", "../other"]),
    ({"weight_map": {"model.norm.weight": 7}}, ["inside the model folder", "7"]),
])
def test_a_bad_sharded_index_is_refused_without_opening_files(capsys, zoo, tmp_path, monkeypatch, index, words):
    import edge.export.sources.hf_folder as hf_folder

    monkeypatch.setattr(hf_folder, "load_safetensors", lambda files: pytest.fail(f"opened {files}"))
    refused_export(capsys, shard(zoo.copy_folder(tmp_path), index), tmp_path, *words)


def test_a_good_sharded_index_still_loads(zoo, tmp_path):
    from safetensors.numpy import load_file

    folder = zoo.copy_folder(tmp_path)
    names = list(load_file(str(folder / "model.safetensors")))
    shard(folder, {"weight_map": {n: "model-00001-of-00001.safetensors" for n in names}})
    assert set(load_source(folder).weights) == set(names)


# ---------------------------------------------------------------- GGUF metadata


def write_gguf(path: Path, overrides: dict, layers_in_tensors: int | None = None) -> Path:
    """tests/test_gguf.py's tiny GGUF with metadata values replaced (None: left out)."""
    from test_gguf import CHAT, FFN, H, HEADS, KV, LAYERS, MERGES, SPECIAL, _vocab, hf_weights, write_tensors

    tokens = _vocab()
    meta = {"llama.block_count": LAYERS, "llama.context_length": 128, "llama.embedding_length": H,
            "llama.feed_forward_length": FFN, "llama.attention.head_count": HEADS,
            "llama.attention.head_count_kv": KV, "llama.rope.freq_base": 50000.0,
            "llama.attention.layer_norm_rms_epsilon": 1e-6, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 0}
    meta.update(overrides)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in meta.items():
        if value is None:
            continue
        if isinstance(value, float):
            w.add_float32(key, value)
        elif value < 0:
            w.add_int32(key, value)
        else:
            w.add_uint32(key, value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
    w.add_token_merges(MERGES)
    w.add_chat_template(CHAT)
    weights = hf_weights(tied=True, bias=False)
    if layers_in_tensors is not None:
        weights = {name: t for name, t in weights.items()
                   if ".layers." not in name or int(name.split(".")[2]) < layers_in_tensors}
    write_tensors(w, weights)
    return path


GGUF_CASES = {
    "head_count 0": ({"llama.attention.head_count": 0}, ["llama.attention.head_count: expected an integer >= 1"]),
    "head_count_kv 0": ({"llama.attention.head_count_kv": 0}, ["llama.attention.head_count_kv: expected an integer"]),
    "head_count_kv 3": ({"llama.attention.head_count_kv": 3}, ["head_count_kv: expected a divisor of head_count 4"]),
    "block_count 0": ({"llama.block_count": 0}, ["llama.block_count: expected an integer >= 1"]),
    "block_count fewer": ({"llama.block_count": 1}, ["llama.block_count is 1 but the weights hold 2 layers"]),
    "rms eps negative": ({"llama.attention.layer_norm_rms_epsilon": -1e-6},
                         ["layer_norm_rms_epsilon: expected a finite number > 0"]),
    "rms eps missing": ({"llama.attention.layer_norm_rms_epsilon": None}, ["layer_norm_rms_epsilon: missing"]),
    "embedding_length": ({"llama.embedding_length": 32}, ["attn_q", "head_count 4"]),
    "embedding 0": ({"llama.embedding_length": 0}, ["llama.embedding_length: expected an integer >= 1"]),
    "head_count negative": ({"llama.attention.head_count": -4}, ["llama.attention.head_count: expected an integer"]),
    "head_count 8": ({"llama.attention.head_count": 8}, ["attn_k", "rows", "head_count_kv 2"]),
    "context 0": ({"llama.context_length": 0}, ["llama.context_length: expected an integer >= 1"]),
    "bos out of range": ({"tokenizer.ggml.bos_token_id": 100000}, ["tokenizer.ggml.bos_token_id", "expected an id"]),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_bad_gguf_metadata(capsys, tmp_path, case):
    overrides, words = GGUF_CASES[case]
    src = tmp_path / "src"
    src.mkdir()
    path = write_gguf(src / "tiny.gguf", overrides)
    refused_export(capsys, path, tmp_path, str(path), *words)


def test_gguf_with_fewer_layers_than_its_metadata(capsys, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    path = write_gguf(src / "tiny.gguf", {"llama.block_count": 3})
    refused_export(capsys, path, tmp_path, "missing", "model.layers.2.")


def test_the_unchanged_tiny_gguf_exports(capsys, tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", {})
    rc, _, err = run_main(export_main, [path, "-o", tmp_path / "out", *EXPORT_ARGS], capsys)
    assert rc == 0, err


# ---------------------------------------------------------------- a manifest vs its graphs, at load


def edit_manifest(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


LOAD_CASES = {
    "chunk_length": (lambda d: d.update(chunk_length=32), ["chunk_length 32", "inputs_embeds", "[1, 16, 64]"]),
    "kv heads": (lambda d: d["model"].update(num_kv_heads=1), ["model.num_kv_heads 1", "past_key_0"]),
    "head_dim": (lambda d: d["model"].update(head_dim=8), ["model.head_dim 8"]),
    "layers more": (lambda d: d["model"].update(num_layers=3), ["plans.split.stages", "one per layer (3), got 2"]),
    "layers fewer": (lambda d: d["model"].update(num_layers=1), ["plans.split.stages", "one per layer (1), got 2"]),
    "layers, fused only": (lambda d: (d["model"].update(num_layers=3), d.pop("plans")),
                           ["model.num_layers 3", "KV cache for 2 layers"]),
    "hidden": (lambda d: d["model"].update(hidden_size=32), ["model.hidden_size 32"]),
    "vocab": (lambda d: d["model"].update(vocab_size=200), ["model.vocab_size 200", "logits"]),
    "split chunk": (lambda d: d["plans"]["split"].update(chunk_length=8), ["plans.split.chunk_length 8"]),
    "prefill input edited": (lambda d: d["graphs"]["prefill"]["inputs"][0].update(shape=[1, 99, 64]),
                             ["graphs.prefill input inputs_embeds has shape [1, 99, 64]", "chunk_length 16"]),
    "max_context 1e9": (lambda d: d.update(max_context=10**9), ["max_context: expected at most 131072"]),
    "max_context float": (lambda d: d.update(max_context=1e9), ["max_context: expected int"]),
    "eos out of range": (lambda d: d["model"].update(eos_token_ids=[2, 5000]), ["eos_token_ids", "[0, 300)"]),
    "bos negative": (lambda d: d["model"].update(bos_token_id=-1), ["bos_token_id", "[0, 300)"]),
}


@pytest.mark.parametrize("case", LOAD_CASES)
def test_manifest_disagreeing_with_its_graphs_is_refused_at_load(zoo, tmp_path, case, monkeypatch):
    """Checked before any session runs: onnxruntime's InvalidArgument mid-generation before."""
    import onnxruntime as ort

    change, words = LOAD_CASES[case]
    b = zoo.copy_bundle(tmp_path, context=64)
    edit_manifest(b, change)
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: pytest.fail("a session was created"))
    with pytest.raises(BundleError) as e:
        Model.load(b, plan="split" if "split" in case else None)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("case", LOAD_CASES)
def test_the_cli_says_it_in_one_line(zoo, tmp_path, capsys, case):
    change, words = LOAD_CASES[case]
    b = zoo.copy_bundle(tmp_path, context=64)
    edit_manifest(b, change)
    before = tree(tmp_path)
    plan = ["--plan", "split"] if "split" in case else []
    rc, out, err = run_main(run_main_cli, [b, "--prompt", "hi", *plan], capsys)
    error_line(err, "edge-run", 1, rc, "manifest.json", *words)
    assert out == "" and tree(tmp_path) == before


def test_errors_name_the_source_file(zoo, tmp_path):
    folder = edit_config(zoo.copy_folder(tmp_path), setter(num_attention_heads=0))
    with pytest.raises(ModelSourceError, match=f"{folder}/config.json: num_attention_heads"):
        from edge.config import ExportOptions
        from edge.export.pipeline import export_model
        from edge.progress import Progress

        export_model(folder, tmp_path / "o", ExportOptions(16, 64), Progress(enabled=False))
    shutil.rmtree(folder)
