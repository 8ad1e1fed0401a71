"""Vision bundles: bad images, prompts and folders are refused clearly (tiny random SmolVLM)."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import VLM_CONTEXT
from tiny_vlm import photos

from edge.config import ExportOptions
from edge.errors import ImageError, PromptError
from edge.progress import Progress
from edge.export.pipeline import export_model
from edge.runtime import Model

ATOL = 1e-3
CONTEXT = VLM_CONTEXT
PHOTOS = photos()


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
