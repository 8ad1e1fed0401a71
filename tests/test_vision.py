"""SmolVLM / Idefics3: export, image preprocessing and image+text generation against transformers.

A tiny random Idefics3 (SigLIP 2 layers, 8x8 patches per 32-px tile, pixel shuffle 2 -> 16 tokens
per tile; LLaMA 2 layers) is built locally and exported from its folder. transformers (float32,
eager attention) is the oracle: the slow Idefics3ImageProcessor / Idefics3Processor for pixels and
token layout, Idefics3ForConditionalGeneration for image features, logits and greedy generation.
Images: real photos from scikit-image (landscape, square, portrait, a 10:1 strip, a small crop) so
tile splitting runs with 1x3 to 3x3 grids, plus RGBA / grey / palette / EXIF-rotated variants.
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from tiny_vlm import load_processor, make_tiny_vlm, photos

from edge.config import ExportOptions
from edge.errors import ImageError, PromptError
from edge.progress import Progress
from edge.export.pipeline import export_model
from edge.runtime import Model
from edge.runtime.image import load_image, preprocess

ATOL = 1e-3  # the float tolerance; measured errors are ~1e-5
CONTEXT = 512
CHUNKS = (24, 200)  # 24: boundaries fall inside every prompt's image tokens; 200: few chunks


PHOTOS = photos()


class VLM:
    def __init__(self, root: Path):
        self.folder = make_tiny_vlm(root / "hf")
        self.bundles = {}
        for c in CHUNKS:
            self.bundles[c] = root / f"bundle-c{c}"
            export_model(self.folder, self.bundles[c], ExportOptions(chunk_length=c, max_context=CONTEXT),
                         Progress(enabled=False))
        self.models = {c: Model.load(p, threads=1) for c, p in self.bundles.items()}
        self.processor = load_processor(self.folder)
        from transformers import Idefics3ForConditionalGeneration

        self.hf = Idefics3ForConditionalGeneration.from_pretrained(
            self.folder, dtype=torch.float32, attn_implementation="eager").eval()
        self.hf.generation_config.eos_token_id = None  # compare a fixed number of greedy tokens
        self.hf.generation_config.pad_token_id = 0

    def hf_inputs(self, content: list[dict], images: list) -> dict:
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        out = self.processor(text=text, images=[Image.fromarray(i) if isinstance(i, np.ndarray) else i
                                                for i in images], return_tensors="pt")
        out.pop("token_type_ids", None)
        return dict(out)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> VLM:
    return VLM(tmp_path_factory.mktemp("vlm"))


def image_spans(ids: list[int], image_id: int) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, t in enumerate(ids + [-1]):
        if t == image_id and start is None:
            start = i
        elif t != image_id and start is not None:
            spans.append((start, i))
            start = None
    return spans


# ---------------------------------------------------------------- export


def test_manifest_records_the_vision_side(vlm):
    m = json.loads((vlm.bundles[24] / "manifest.json").read_text())
    v = m["vision"]
    pre = json.loads((vlm.folder / "preprocessor_config.json").read_text())
    assert (v["image_size"], v["patch_size"], v["scale_factor"], v["tokens_per_tile"]) == (32, 4, 2, 16)
    assert v["longest_edge"] == pre["size"]["longest_edge"] and v["max_image_size"] == 32
    assert v["image_mean"] == pytest.approx(pre["image_mean"]) and v["image_std"] == pytest.approx(pre["image_std"])
    assert v["image_token_id"] == json.loads((vlm.folder / "config.json").read_text())["image_token_id"]
    assert (v["image_token"], v["fake_image_token"], v["global_image_token"]) == (
        "<image>", "<fake_token_around_image>", "<global-img>")
    assert v["linear_weights"] == "fp32"  # the default; int8: tests/test_vision_quant.py
    g = m["graphs"]["vision"]
    assert g["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": [1, 3, 32, 32]}]
    assert g["outputs"] == [{"name": "image_embeds", "dtype": "float32", "shape": [1, 16, 64]}]


def test_text_graphs_are_the_llama_graphs(vlm, tmp_path):
    """The decoder of a VLM bundle is node for node the graph a LlamaForCausalLM with the same
    weights exports to: all runtime code (prefill, decode, KV cache, quantization) is shared."""
    from transformers import LlamaConfig, LlamaForCausalLM

    text_cfg = json.loads((vlm.folder / "config.json").read_text())["text_config"]
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in text_cfg.items() if k != "model_type"}))
    state = {("model." + k[len("model.text_model."):] if k.startswith("model.text_model.") else k): v
             for k, v in vlm.hf.state_dict().items() if not k.startswith(("model.vision_model", "model.connector"))}
    llama.load_state_dict(state)
    llama.save_pretrained(tmp_path / "llama")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "llama" / f).write_bytes((vlm.folder / f).read_bytes())
    export_model(tmp_path / "llama", tmp_path / "b", ExportOptions(chunk_length=24, max_context=CONTEXT),
                 Progress(enabled=False))

    def form(path):
        g = onnx.load(str(path), load_external_data=False).graph
        return ([(n.op_type, n.name, list(n.input), list(n.output)) for n in g.node],
                [(i.name, i.dims) for i in g.initializer], str(g.input), str(g.output))

    for graph in ("embed", "prefill", "decode"):
        assert form(vlm.bundles[24] / f"{graph}.onnx") == form(tmp_path / "b" / f"{graph}.onnx"), graph
    assert (vlm.bundles[24] / "weights.bin").stat().st_size > (tmp_path / "b" / "weights.bin").stat().st_size


# ---------------------------------------------------------------- preprocessing and prompt layout


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_prompt_layout_and_pixels_match_the_processor(vlm, name):
    model, photo = vlm.models[24], PHOTOS[name]
    ref = vlm.hf_inputs([{"type": "image"}, {"type": "text", "text": "What is in this photo?"}], [photo])
    ids, _ = model.prepare_prompt("What is in this photo?", images=[photo])
    assert ids == ref["input_ids"][0].tolist()
    tiles, plan = preprocess(load_image(photo), model.vision.cfg)
    assert tiles.shape == ref["pixel_values"].shape[1:]
    np.testing.assert_allclose(tiles, ref["pixel_values"][0].numpy(), atol=1e-6, rtol=0)
    grids = {"coffee_landscape": (2, 3), "astronaut_square": (3, 3), "chelsea_portrait": (3, 2),
             "coffee_strip_10to1": (1, 3), "coffee_small": (3, 3)}
    assert (plan.rows, plan.cols) == grids[name]


def _rgba(a):
    alpha = np.random.default_rng(0).integers(0, 256, a.shape[:2], dtype=np.uint8)
    return np.dstack([a, alpha])


def _exif_rotated_jpeg(path: Path) -> Path:
    img = Image.fromarray(PHOTOS["coffee_landscape"])
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    img.save(path, exif=exif)
    return path


def test_image_kinds_match_the_processor(vlm, tmp_path):
    """PIL modes and numpy layouts as the processor takes them; files as transformers'
    load_image + processor (EXIF orientation, RGB); settings without splitting / resizing."""
    from transformers import Idefics3ImageProcessor
    from transformers.image_utils import load_image as hf_load_image

    cfg = vlm.models[24].vision.cfg
    coffee, astronaut = PHOTOS["coffee_landscape"], PHOTOS["astronaut_square"]
    Image.fromarray(_rgba(coffee), "RGBA").save(tmp_path / "rgba.png")
    cases = {  # name: (our input, the processor's input)
        "pil_rgba": (Image.fromarray(_rgba(coffee), "RGBA"),) * 2,
        "pil_grey": (Image.fromarray(coffee).convert("L"),) * 2,
        "pil_palette": (Image.fromarray(astronaut).convert("P", palette=Image.Palette.ADAPTIVE, colors=64),) * 2,
        "numpy_rgba": (_rgba(coffee),) * 2,
        "numpy_grey_hw1": (coffee[..., :1].copy(),) * 2,
        "numpy_grey_hw": (coffee[..., 0].copy(), Image.fromarray(coffee[..., 0].copy())),
        "file_exif": (_exif_rotated_jpeg(tmp_path / "exif.jpg"), hf_load_image(str(tmp_path / "exif.jpg"))),
        "bytes_png_rgba": ((tmp_path / "rgba.png").read_bytes(), hf_load_image(str(tmp_path / "rgba.png"))),
    }
    processor = Idefics3ImageProcessor.from_pretrained(vlm.folder)
    for name, (ours, theirs) in cases.items():
        # (1-channel inputs need the explicit format in transformers 4.57, which cannot infer it)
        ref = processor(images=[theirs], return_tensors="np", input_data_format="channels_last")["pixel_values"][0]
        tiles, _ = preprocess(load_image(ours), cfg)
        assert tiles.shape == ref.shape, name
        np.testing.assert_allclose(tiles, ref, atol=1e-6, rtol=0, err_msg=name)
    for change in ({"do_image_splitting": False}, {"do_resize": False}):
        ref = Idefics3ImageProcessor.from_pretrained(vlm.folder, **change)(
            images=[Image.fromarray(coffee[:50, :70])], return_tensors="np")["pixel_values"][0]
        tiles, _ = preprocess(load_image(coffee[:50, :70]), dataclasses.replace(cfg, **change))
        np.testing.assert_allclose(tiles, ref, atol=1e-6, rtol=0, err_msg=str(change))


# ---------------------------------------------------------------- numerics against transformers


@pytest.mark.parametrize("name", ["coffee_landscape", "astronaut_square", "chelsea_portrait", "coffee_strip_10to1"])
def test_image_embeddings_and_logits_match_transformers(vlm, name):
    photo = PHOTOS[name]
    ref = vlm.hf_inputs([{"type": "image"}, {"type": "text", "text": "Describe the photo."}], [photo])
    with torch.no_grad():
        out = vlm.hf(**ref)
    feats, logits = out.image_hidden_states.numpy(), out.logits[0].numpy()
    assert feats.std() > 1 and logits.std() > 1  # the comparison means something
    for chunk, model in vlm.models.items():
        ids, embeds = model.prepare_prompt("Describe the photo.", images=[photo])
        assert ids == ref["input_ids"][0].tolist()
        tiles, _ = preprocess(load_image(photo), model.vision.cfg)
        np.testing.assert_allclose(model.vision.encode(tiles), feats, atol=ATOL, rtol=0)
        got = model.prefill(embeds, model.new_cache(), all_logits=True)
        np.testing.assert_allclose(got, logits, atol=ATOL, rtol=0, err_msg=f"chunk {chunk}")
        if chunk == 24:  # chunk boundaries fall strictly inside the image tokens
            spans = image_spans(ids, model.vision.cfg.image_token_id)
            assert any(a < b0 < b for a, b in spans for b0 in range(chunk, len(ids), chunk))


def test_images_change_the_logits(vlm):
    """The merge really lands: two photos give different logits on the same text."""
    model = vlm.models[24]
    a = model.prefill(model.prepare_prompt("Hi", images=[PHOTOS["coffee_landscape"]])[1], model.new_cache())
    b = model.prefill(model.prepare_prompt("Hi", images=[PHOTOS["chelsea_portrait"][:400, :300]])[1],
                      model.new_cache())
    assert np.abs(a - b).max() > 0.1


def test_greedy_generation_matches_transformers(vlm):
    """Two images placed by <image> in the prompt, chunk boundaries inside image tokens, 16 greedy
    tokens token for token; and the text API gives the same tokens."""
    model = vlm.models[24]
    images = [PHOTOS["coffee_landscape"], PHOTOS["chelsea_portrait"]]
    prompt = "Compare <image> with <image>, please."
    ref = vlm.hf_inputs([{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": " with "},
                         {"type": "image"}, {"type": "text", "text": ", please."}], images)
    ids, embeds = model.prepare_prompt(prompt, images=images)
    assert ids == ref["input_ids"][0].tolist()
    ours = list(model.generate_ids(ids, 16, stop_ids=(), embeds=embeds))
    with torch.no_grad():
        theirs = vlm.hf.generate(**ref, max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    assert ours == theirs
    assert len(set(ours)) > 1
    stopped = list(model.generate_ids(ids, 16, embeds=embeds))  # with the bundle's stop tokens
    assert ours[:len(stopped)] == stopped
    text = model.generate(prompt, images=[Image.fromarray(i) for i in images], max_new_tokens=16)
    assert text == model.tokenizer.decode(stopped)


def test_smolvlm_architecture_exports_too(tmp_path):
    from transformers import SmolVLMForConditionalGeneration

    folder = make_tiny_vlm(tmp_path / "hf", seed=5, architecture="SmolVLMForConditionalGeneration")
    export_model(folder, tmp_path / "b", ExportOptions(chunk_length=24, max_context=CONTEXT), Progress(enabled=False))
    model = Model.load(tmp_path / "b", threads=1)
    hf = SmolVLMForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                         attn_implementation="eager").eval()
    processor = load_processor(folder)
    photo = Image.fromarray(PHOTOS["coffee_landscape"])
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                                         add_generation_prompt=True)
    ref = processor(text=text, images=[photo], return_tensors="pt")
    ids, embeds = model.prepare_prompt("Hi", images=[photo])
    assert ids == ref["input_ids"][0].tolist()
    with torch.no_grad():
        logits = hf(**ref).logits[0].numpy()
    np.testing.assert_allclose(model.prefill(embeds, model.new_cache(), all_logits=True), logits, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- board: no torch, no transformers

BOARD = textwrap.dedent("""
    import importlib.abc, json, sys
    BLOCKED = {"torch", "transformers", "onnx", "edge.export", "edge.bench", "safetensors", "skimage", "scipy", "sklearn"}
    attempts = []

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                attempts.append(name)
                raise ImportError(f"{name} is blocked (not installed on a board)")
            return None

    sys.meta_path.insert(0, Block())
    try:
        import torch  # noqa: F401
    except ImportError:
        attempts.clear()
    else:
        raise SystemExit("guard failed")
    import numpy as np
    from edge.runtime import Model
    from edge.runtime.cli import main as run_main

    bundle, photo = sys.argv[1], sys.argv[2]
    model = Model.load(bundle)
    out = {
        "path": model.generate("What is this?", images=[photo], max_new_tokens=8),
        "bytes": model.generate("What is this?", images=open(photo, "rb").read(), max_new_tokens=8),
        "ids": model.prepare_prompt("What is this?", images=[photo])[0],
    }
    assert run_main([bundle, "--image", photo, "--prompt", "What is this?", "--max-new-tokens", "3"]) == 0
    print("RESULT " + json.dumps({"out": out, "attempts": attempts}))
""")


def test_runtime_image_path_runs_without_torch_and_transformers(vlm, tmp_path):
    from conftest import REPO

    photo = tmp_path / "coffee.png"
    Image.fromarray(PHOTOS["coffee_landscape"]).save(photo)
    script = tmp_path / "board.py"
    script.write_text(BOARD)
    r = subprocess.run([sys.executable, str(script), str(vlm.bundles[24]), str(photo)], cwd=REPO,
                       capture_output=True, text=True, encoding="utf-8", timeout=120,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    result = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    assert result["attempts"] == []
    model = vlm.models[24]
    expected = model.generate("What is this?", images=[PHOTOS["coffee_landscape"]], max_new_tokens=8)
    assert result["out"]["path"] == result["out"]["bytes"] == expected
    assert result["out"]["ids"] == model.prepare_prompt("What is this?", images=[PHOTOS["coffee_landscape"]])[0]


def test_cli_takes_repeated_images(vlm, cli, tmp_path):
    paths = []
    for name in ("coffee_landscape", "astronaut_square"):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(PHOTOS[name]).save(paths[-1])
    r = cli("edge.runtime.cli", vlm.bundles[24], "--image", paths[0], "--image", paths[1], "--prompt", "Which one?",
            "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    expected = vlm.models[24].generate("Which one?", images=[PHOTOS["coffee_landscape"], PHOTOS["astronaut_square"]],
                                       max_new_tokens=8)
    assert r.stdout == expected + "\n"
    r = cli("edge.runtime.cli", vlm.bundles[24], "--image", tmp_path / "missing.png", "--prompt", "Hi")
    assert r.returncode == 1 and "missing.png" in r.stderr and "no such file" in r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------- bad input


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size (a decompression bomb never gets decoded)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(PHOTOS["coffee_landscape"]).save(buf, "JPEG")
    return buf.getvalue()[:3000]


BAD_IMAGES = {
    "not_an_image": (b"hello, this is text", "not a readable image"),
    "empty_bytes": (b"", "empty bytes"),
    "truncated_jpeg": (_truncated_jpeg(), "corrupt or truncated"),
    "missing_file": (Path("/nonexistent/photo.jpg"), "no such file"),
    "huge_header": (_png_header_claiming(60000, 60000), "too large"),
    "too_many_pixels": (Image.new("1", (9000, 9000)), "too large"),
    "too_wide": (Image.new("L", (20000, 2)), "too large"),
    "zero_size_array": (np.zeros((0, 10, 3), np.uint8), "empty image"),
    "float_array": (np.zeros((10, 10, 3), np.float32), "must be uint8"),
    "channels_first_array": (np.zeros((3, 10, 10), np.uint8), "channels last"),
    "two_channel_array": (np.zeros((10, 10, 2), np.uint8), "channels last"),
    "mode_I16": (Image.new("I;16", (10, 10)), "high bit depth"),
    "mode_F": (Image.new("F", (10, 10)), "high bit depth"),
    "mode_La": (Image.new("La", (10, 10)), "cannot be converted"),
    "wrong_type": (12345, "expected a file path"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_are_refused_clearly(vlm, case):
    image, words = BAD_IMAGES[case]
    with pytest.raises(ImageError, match=words) as e:
        vlm.models[24].generate("Hi", images=[image], max_new_tokens=2)
    assert str(e.value).startswith("image 1")


def test_convertible_modes_are_accepted(vlm):
    photo = Image.fromarray(PHOTOS["coffee_small"])
    for mode in ("CMYK", "YCbCr", "LA", "1", "RGBX", "PA"):
        img = photo.convert("P").convert("PA") if mode == "PA" else photo.convert(mode)
        ids, embeds = vlm.models[24].prepare_prompt("Hi", images=[img])
        assert embeds.shape[1] == len(ids)


def test_image_for_a_text_only_bundle(zoo):
    with pytest.raises(ImageError, match="text-only"):
        zoo.model("llama", 16).generate("Hi", images=[PHOTOS["coffee_small"]], max_new_tokens=2)


def test_too_many_image_tokens_for_the_context(vlm):
    # 3 square photos x (9 tiles + 1) x 16 tokens > 512 positions: refused before any vision run
    with pytest.raises(PromptError, match=r"480 of them for 3 image\(s\).*context holds 512"):
        vlm.models[24].generate("Hi", images=[PHOTOS["astronaut_square"]] * 3, max_new_tokens=2)


def test_placeholder_count_must_match(vlm):
    model = vlm.models[24]
    with pytest.raises(PromptError, match="2 <image> placeholders but 1 images"):
        model.generate("<image> and <image>", images=[PHOTOS["coffee_small"]], max_new_tokens=2)
    with pytest.raises(PromptError, match="1 <image> placeholders but 2 images"):
        model.generate("<image> raw", images=[PHOTOS["coffee_small"]] * 2, raw=True, max_new_tokens=2)
    with pytest.raises(PromptError, match="1 <image> placeholders but 0 images"):
        model.generate("<image> alone", raw=True, max_new_tokens=2)


@pytest.mark.parametrize("damage", ["bad_field", "no_vision_graph"])
def test_damaged_vision_manifest_is_refused(vlm, tmp_path, damage):
    import shutil

    from edge.errors import BundleError

    bundle = tmp_path / "b"
    shutil.copytree(vlm.bundles[24], bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    if damage == "bad_field":
        m["vision"]["tile_batch"] = "one"
        words = "vision.tile_batch"
    else:
        del m["graphs"]["vision"]
        words = "graphs.vision: missing"
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=words):
        Model.load(bundle)


@pytest.mark.parametrize("damage, words", [
    ("act", "hidden_act 'quick_gelu' is not supported"),
    ("seq_len", "image_seq_len 99 but the model makes 16 tokens per tile"),
    ("tile", "differs from the encoder's image_size"),
    ("no_vision_weights", r"weights \(vision\): 16 tensors missing"),
    ("vision_heads", r"vision_config: hidden_size \d+ is not a multiple of num_attention_heads 7"),
    ("vision_layers", r"vision_config.num_hidden_layers is 1 but the weights hold 2 layers"),
    ("patch_zero", r"vision_config: patch_size: expected an integer >= 1, got int 0"),
    ("vision_intermediate", r"weights \(vision\): \d+ tensors have the wrong shape .*fc1"),
])
def test_unsupported_vlm_folders_are_refused_at_export(vlm, tmp_path, damage, words):
    import shutil

    from edge.errors import ModelSourceError

    folder = tmp_path / "hf"
    shutil.copytree(vlm.folder, folder)
    edit = {"act": ("config.json", lambda c: c["vision_config"].update(hidden_act="quick_gelu")),
            "seq_len": ("processor_config.json", lambda c: c.update(image_seq_len=99)),
            "tile": ("preprocessor_config.json", lambda c: c.update(max_image_size={"longest_edge": 64})),
            "vision_heads": ("config.json", lambda c: c["vision_config"].update(num_attention_heads=7)),
            "vision_layers": ("config.json", lambda c: c["vision_config"].update(num_hidden_layers=1)),
            "patch_zero": ("config.json", lambda c: c["vision_config"].update(patch_size=0)),
            "vision_intermediate": ("config.json", lambda c: c["vision_config"].update(intermediate_size=8)),
            "no_vision_weights": None}[damage]
    if edit is None:
        from safetensors.numpy import load_file, save_file

        w = load_file(str(folder / "model.safetensors"))
        save_file({k: v for k, v in w.items() if "vision_model.encoder.layers.1." not in k},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        path = folder / edit[0]
        cfg = json.loads(path.read_text())
        edit[1](cfg)
        path.write_text(json.dumps(cfg))
    with pytest.raises(ModelSourceError, match=words):  # UnsupportedModelError or ConfigError
        export_model(folder, tmp_path / "b", ExportOptions(chunk_length=24, max_context=CONTEXT), Progress(enabled=False))


def test_bfloat16_checkpoint_exports(vlm, tmp_path):
    """Real SmolVLM folders store bfloat16 (numpy has no such dtype): weights widen exactly to float32."""
    import copy
    import shutil

    from transformers import Idefics3ForConditionalGeneration

    folder = tmp_path / "hf"
    copy.deepcopy(vlm.hf).to(torch.bfloat16).save_pretrained(folder)
    for f in vlm.folder.iterdir():
        if f.suffix in (".json", ".jinja") and f.name != "config.json":
            shutil.copy(f, folder / f.name)
    export_model(folder, tmp_path / "b", ExportOptions(chunk_length=24, max_context=CONTEXT), Progress(enabled=False))
    hf = Idefics3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    model = Model.load(tmp_path / "b", threads=1)
    ref = vlm.hf_inputs([{"type": "image"}, {"type": "text", "text": "Hi"}], [PHOTOS["coffee_small"]])
    ids, embeds = model.prepare_prompt("Hi", images=[PHOTOS["coffee_small"]])
    assert ids == ref["input_ids"][0].tolist()
    with torch.no_grad():
        logits = hf(**ref).logits[0].numpy()
    np.testing.assert_allclose(model.prefill(embeds, model.new_cache(), all_logits=True), logits, atol=ATOL, rtol=0)
