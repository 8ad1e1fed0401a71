"""int8 vision linears (``edge-export --vision-weights int8``): graph against a numpy reference,
image embeddings int8 vs float on real photos, greedy tokens with an image, bundle size.

What is measured on what: the tiny random Idefics3 of tests/tiny_vlm.py (SigLIP 2 layers, width
32, 32-px tiles of 8x8 patches; LLaMA 2 layers), normal weights and a heavier-tailed variant
(Student t, 3 degrees of freedom), on scikit-image photos split into 1x3 to 3x3 tiles plus the
global image. A random model is a weaker check than trained weights (no learned outlier channels).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tiny_vlm import make_tiny_vlm, photos

from edge.config import ExportOptions
from edge.errors import BundleError
from edge.progress import Progress
from edge.export.cli import main as export_main
from edge.export.families import family_for
from edge.export.graph.builder import WeightStore
from edge.export.quant.linears import PlannedLinear
from edge.export.graph.vision import build_vision_graph
from edge.export.pipeline import export_model
from edge.export.sources import load_source
from edge.export.quant.vision import (
    calibrate_w8a8,
    embedding_cosines,
    int8_np_linear,
    matmulnbits_np_linear,
    planned_np_linear,
    reference_image_embeds,
    vision_linear,
    vision_linear_names,
)
from edge.runtime import Model
from edge.runtime.image import load_image, preprocess

PHOTOS = photos()
CONTEXT, CHUNK = 512, 24  # 24: chunk boundaries fall inside the image tokens
MIN_COSINE = 0.99  # the target, asserted on every image token (measured >= 0.9994)
REF_ATOL = 1e-4  # graph vs its numpy formula; embeddings reach |8|, measured errors ~4e-6


class Bundles:
    def __init__(self, root: Path):
        self.folder = make_tiny_vlm(root / "hf")
        self.float = root / "b-fp32"
        export_model(self.folder, self.float, ExportOptions(chunk_length=CHUNK, max_context=CONTEXT, plans=("fused",)),
                     Progress(enabled=False))
        self.int8 = root / "b-int8"  # through the CLI flag
        assert export_main([str(self.folder), "-o", str(self.int8), "--chunk", str(CHUNK), "--context", str(CONTEXT),
                            "--plans", "fused", "--quant", "fp32", "--vision-weights", "int8", "--quiet"]) == 0
        self.models = {"fp32": Model.load(self.float, threads=1), "int8": Model.load(self.int8, threads=1)}
        src = load_source(self.folder)
        fam = family_for(src.architecture)
        cfg = fam.config(src.hf_config, src.special_tokens)
        self.weights, self.cfg = fam.sanitize(src.weights, cfg), fam.vision(src, cfg)

    def tiles(self, name: str) -> np.ndarray:
        return preprocess(load_image(PHOTOS[name]), self.cfg)[0]


@pytest.fixture(scope="module")
def qb(tmp_path_factory) -> Bundles:
    return Bundles(tmp_path_factory.mktemp("qvlm"))


def _session(path: Path, optimize: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, tiles: np.ndarray) -> np.ndarray:
    return np.concatenate([session.run(["image_embeds"], {"pixel_values": tiles[i:i + 1]})[0]
                           for i in range(len(tiles))])


def test_manifest_records_int8_and_graph_holds_int8_weights(qb):
    v = json.loads((qb.int8 / "manifest.json").read_text())["vision"]
    assert v["linear_weights"] == "int8" and qb.models["int8"].vision.cfg.linear_weights == "int8"
    assert qb.models["fp32"].vision.cfg.linear_weights == "fp32"
    inits = {i.name: i for i in onnx.load(str(qb.int8 / "vision.onnx"), load_external_data=False).graph.initializer}
    names = vision_linear_names(qb.cfg)
    assert len(names) == 6 * qb.cfg.num_layers + 1
    for n in names:
        assert inits[n + ".w8"].data_type == onnx.TensorProto.INT8, n
        assert n + ".weight" not in inits, n  # no float copy of a quantized matrix


def test_manifest_without_the_field_reads_as_fp32_and_bad_values_are_refused(qb, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(qb.float, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    del m["vision"]["linear_weights"]  # a bundle written before the field existed
    (bundle / "manifest.json").write_text(json.dumps(m))
    assert Model.load(bundle).vision.cfg.linear_weights == "fp32"
    m["vision"]["linear_weights"] = "int4"
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="linear_weights must be one of fp32, int8"):
        Model.load(bundle)
    with pytest.raises(ValueError, match="vision weights must be one of"):
        ExportOptions(vision_weights="int4")


@pytest.mark.parametrize("name", ["coffee_landscape", "chelsea_portrait"])
def test_int8_graph_matches_the_numpy_int8_formula(qb, name):
    """Literally (no graph optimization) the graph is x @ dequant(int8 W)^T + b with float x: equal
    to its numpy formula within REF_ATOL. As the runtime runs it, onnxruntime's 8-bit MatMulNBits
    also rounds x to int8 per row and 32-channel block: its numpy formula matches within REF_ATOL
    except where an activation lands on the other side of a rounding step (float sums upstream differ
    in the last bit): a few image tokens, within 0.1 (embeddings reach |8|)."""
    tiles = qb.tiles(name)
    literal = reference_image_embeds(qb.cfg, qb.weights, tiles, int8_np_linear)
    fused = reference_image_embeds(qb.cfg, qb.weights, tiles, matmulnbits_np_linear)
    np.testing.assert_allclose(_run(_session(qb.int8 / "vision.onnx", optimize=False), tiles), literal,
                               atol=REF_ATOL, rtol=0)
    got = qb.models["int8"].vision.encode(tiles)
    err = np.abs(got - fused)
    assert (err > REF_ATOL).mean() <= 0.05 and err.max() < 0.1
    assert err.mean() < np.abs(got - literal).mean() / 20  # the fused formula is the one that runs
    # and the numpy float reference is the float graph (itself checked against transformers)
    np.testing.assert_allclose(qb.models["fp32"].vision.encode(tiles),
                               reference_image_embeds(qb.cfg, qb.weights, tiles), atol=REF_ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_int8_image_embeddings_keep_cosine_on_real_photos(qb, name):
    tiles = qb.tiles(name)
    assert len(tiles) >= 4  # split tiles + the global image
    ref, got = qb.models["fp32"].vision.encode(tiles), qb.models["int8"].vision.encode(tiles)
    cos = embedding_cosines(got, ref)
    print(f"{name}: {len(tiles)} tiles, cosine per image token mean {cos.mean():.5f} min {cos.min():.5f}")
    assert ref.std() > 1  # the comparison means something
    assert cos.min() >= MIN_COSINE


def test_heavier_tailed_weights_keep_cosine(tmp_path):
    """Student t weights (a few large values per row) in the encoder and connector."""
    folder = make_tiny_vlm(tmp_path / "hf", seed=3, tails="student_t")
    src = load_source(folder)
    fam = family_for(src.architecture)
    dcfg = fam.config(src.hf_config, src.special_tokens)
    weights, cfg = fam.sanitize(src.weights, dcfg), fam.vision(src, dcfg)
    row = weights[vision_linear_names(cfg)[0] + ".weight"][0]
    assert np.abs(row).max() / row.std() > 3  # heavier than the normal init
    out = {}
    for scheme in ("fp32", "int8"):
        d = tmp_path / scheme
        d.mkdir()
        store = WeightStore()
        graph = build_vision_graph(cfg, weights, store, vision_linear(scheme))
        store.write(d)
        onnx.save_model(graph, str(d / "vision.onnx"))
        out[scheme] = _session(d / "vision.onnx")
    for name in ("coffee_landscape", "astronaut_square", "chelsea_portrait"):
        tiles = preprocess(load_image(PHOTOS[name]), cfg)[0]
        cos = embedding_cosines(_run(out["int8"], tiles), _run(out["fp32"], tiles))
        print(f"student_t {name}: cosine mean {cos.mean():.5f} min {cos.min():.5f}")
        assert cos.min() >= MIN_COSINE


def test_greedy_tokens_with_images_match_the_float_bundle(qb):
    images = [PHOTOS["coffee_landscape"], PHOTOS["chelsea_portrait"]]
    prompt = "Compare <image> with <image>, please."
    tokens = {}
    for scheme, model in qb.models.items():
        ids, embeds = model.prepare_prompt(prompt, images=images)
        tokens[scheme] = list(model.generate_ids(ids, 16, stop_ids=(), embeds=embeds))
    assert len(ids) > 3 * CHUNK  # several chunks, boundaries inside the image tokens
    assert tokens["int8"] == tokens["fp32"]
    assert len(set(tokens["fp32"])) > 1


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_next_token_choices_with_an_image(qb, name):
    """Teacher-forced on the float bundle's 32 greedy tokens: the int8-vision bundle picks the same
    next token except where the float model's top two logits are within 0.1 (a random model has
    many near ties; logits' std ~1.5); free-running greedy text can then part ways."""
    mf, mi = qb.models["fp32"], qb.models["int8"]
    ids, ef = mf.prepare_prompt("What is this?", images=[PHOTOS[name]])
    _, ei = mi.prepare_prompt("What is this?", images=[PHOTOS[name]])
    toks = list(mf.generate_ids(ids, 32, stop_ids=(), embeds=ef))
    lf = mf.prefill(np.concatenate([ef, mf.embed(toks)], 1), mf.new_cache(), all_logits=True)[len(ids) - 1:-1]
    li = mi.prefill(np.concatenate([ei, mi.embed(toks)], 1), mi.new_cache(), all_logits=True)[len(ids) - 1:-1]
    assert (lf.argmax(-1) == np.asarray(toks)).all()
    top2 = np.sort(lf, -1)[:, -2:]
    differ = lf.argmax(-1) != li.argmax(-1)
    print(f"{name}: next-token agreement {1 - differ.mean():.3f}, float margins where they differ "
          f"{(top2[differ, 1] - top2[differ, 0]).round(3).tolist()}")
    assert differ.mean() <= 0.2 and (top2[differ, 1] - top2[differ, 0] < 0.1).all()


def test_vision_bytes_shrink(qb):
    """The int8 matrices replace the float ones in weights.bin: 1 byte per weight + 5 per row."""
    linears = [qb.weights[n + ".weight"] for n in vision_linear_names(qb.cfg)]
    float_bytes = sum(w.nbytes for w in linears)
    int8_bytes = sum(w.size + 5 * len(w) for w in linears)  # int8 + float scale + int8 zero point per row
    size = {s: (b / "weights.bin").stat().st_size for s, b in (("fp32", qb.float), ("int8", qb.int8))}
    total = {s: sum(r["size"] for r in json.loads((b / "manifest.json").read_text())["files"].values())
             for s, b in (("fp32", qb.float), ("int8", qb.int8))}
    saved = size["fp32"] - size["int8"]
    print(f"vision linears {float_bytes} -> {int8_bytes} bytes; weights.bin {size['fp32']} -> {size['int8']}; "
          f"bundle {total['fp32']} -> {total['int8']}")
    assert abs(saved - (float_bytes - int8_bytes)) <= 64 * len(linears)  # alignment padding only
    # vision.onnx itself grows (more nodes: ~15 KB here, nothing at real sizes)
    assert total["int8"] < total["fp32"] - 0.5 * float_bytes


def test_w8a8_static_activations_calibrated_on_photos(qb):
    """Experimental (Python only): static per-tensor int8 activations, ranges from two photos,
    measured on others. Graph = numpy fake-quant formula, and the cosine target holds on average."""
    calib = np.concatenate([qb.tiles("astronaut_square"), qb.tiles("coffee_small")])
    plans = calibrate_w8a8(qb.cfg, qb.weights, calib)
    assert set(plans) == set(vision_linear_names(qb.cfg))
    store = WeightStore()
    graph = build_vision_graph(qb.cfg, qb.weights, store, PlannedLinear(plans))
    d = qb.int8.parent / "w8a8"
    d.mkdir(exist_ok=True)
    store.write(d)
    onnx.save_model(graph, str(d / "vision.onnx"))
    tiles = qb.tiles("chelsea_portrait")
    got = _run(_session(d / "vision.onnx", optimize=False), tiles)
    np.testing.assert_allclose(got, reference_image_embeds(qb.cfg, qb.weights, tiles, planned_np_linear(plans)),
                               atol=REF_ATOL, rtol=0)
    cos = embedding_cosines(_run(_session(d / "vision.onnx"), tiles), qb.models["fp32"].vision.encode(tiles))
    print(f"w8a8 chelsea_portrait: cosine mean {cos.mean():.5f} min {cos.min():.5f}")
    assert cos.mean() >= MIN_COSINE


@pytest.mark.parametrize("flags, prefill, vision", [((), "fp32", "fp32"), (("--quant", "w8a8"), "w8a8", "int8")])
def test_cli_default_keeps_vision_language_models_float(qb, tmp_path, flags, prefill, vision):
    """--quant auto: a vision-language model stays float (its image tokens were never calibrated);
    an explicit --quant w8a8 still quantizes the decoder and, with it, the vision linears."""
    out = tmp_path / "b"
    assert export_main([str(qb.folder), "-o", str(out), "--chunk", str(CHUNK), "--context", str(CONTEXT),
                        "--plans", "fused", "--eval-tokens", "128", "--calib-tokens", "512", "--quiet", *flags]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["quantization"]["prefill"] == prefill and m["vision"]["linear_weights"] == vision
