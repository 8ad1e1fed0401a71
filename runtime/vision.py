"""Prompts with images: token layout, vision encoder runs, and image embeddings merged into the prompt.

The order of work puts every refusal before the expensive part: images are opened and checked,
their tile grids computed from their sizes alone, the prompt laid out and tokenized and its
length checked against the context; only then are tiles resized and run through the vision graph.

Merging is transformers' ``inputs_merger``: the prompt's token embeddings (embed graph), with the
rows at ``<image>`` token positions replaced, in order, by the image-token embeddings of the tiles
(row-major crops, then the global image; images in prompt order). The result feeds the usual
chunked prefill, so a chunk boundary may fall anywhere, inside an image's tokens included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from edge.errors import ImageError, PromptError
from edge.manifest import Manifest

from edge.runtime.bundle import Bundle
from edge.runtime.sessions import open_session
from edge.runtime.tokenizer import check_text

if TYPE_CHECKING:
    from edge.runtime.model import Model

MAX_IMAGES = 64  # per prompt; far beyond what any context holds, refused before anything is opened


class VisionEncoder:
    """The bundle's static vision graph: tiles [tile_batch, 3, S, S] -> image_embeds [tile_batch, n, H]."""

    def __init__(self, bundle: Bundle, manifest: Manifest, options: ort.SessionOptions):
        self.cfg = manifest.vision
        spec = manifest.graphs["vision"]
        path = bundle.file(spec.file)
        self.session = open_session(path, options, spec=spec)

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        """tiles [T, 3, S, S] -> [T, tokens_per_tile, text_hidden]; the last batch is zero-padded."""
        b = self.cfg.tile_batch
        out = []
        for i in range(0, len(tiles), b):
            batch = tiles[i:i + b]
            count = len(batch)
            if count < b:
                batch = np.concatenate([batch, np.zeros((b - count, *batch.shape[1:]), np.float32)])
            out.append(self.session.run(["image_embeds"], {"pixel_values": np.ascontiguousarray(batch)})[0][:count])
        return np.concatenate(out)


def _as_list(images: Any) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]  # one image: a path, bytes, an array or a PIL image


def _chat_pieces(model: "Model", prompt: str, n_images: int) -> list[tuple[str, bool]]:
    """The chat template rendered for one user turn with the images, as (text, is_user_text)
    pieces; the template's own text holds one image token per image, in order.

    ``<image>`` in the prompt marks where the images go (one per image); without any, the images
    come first. The template gets list content (``{"type": "image"}``, ``{"type": "text"}``), as
    SmolVLM's does; a template that only takes string content gets image tokens in the text."""
    cfg = model.vision.cfg
    segments = prompt.split(cfg.image_token)
    if len(segments) == 1:
        segments = [""] * n_images + segments
    elif len(segments) - 1 != n_images:
        raise PromptError(f"the prompt has {len(segments) - 1} {cfg.image_token} placeholders but {n_images} "
                          f"images were given; use one per image, or none to put the images first")
    user: list[str] = []
    content: list[dict[str, str]] = []
    for k, seg in enumerate(segments):
        if k:
            content.append({"type": "image"})
        if seg:
            content.append({"type": "text", "text": model.tokenizer.slot(len(user))})
            user.append(seg)
    attempts = [content, "".join(cfg.image_token if c["type"] == "image" else c["text"] for c in content)]
    for body in attempts:
        pieces, found, skeleton = model.tokenizer.template_pieces([{"role": "user", "content": body}], user)
        listed = "'type'" in skeleton or '"type"' in skeleton  # a string-only template printed the list
        if found == list(range(len(user))) and skeleton.count(cfg.image_token) == n_images and not listed:
            break
    else:
        raise PromptError("the bundle's chat template does not place the images (no image token in its output); "
                          "pass raw=True (edge-run --raw) with one image token per image in the prompt")
    return pieces


def _expand(pieces: list[tuple[str, bool]], plans: list, cfg) -> list[tuple[str, bool]]:
    from edge.runtime.image import image_prompt_string

    out, k = [], 0
    for text, user in pieces:
        if not user:
            parts = text.split(cfg.image_token)
            text = parts[0]
            for rest in parts[1:]:
                text += image_prompt_string(plans[k], cfg) + rest
                k += 1
        out.append((text, user))
    return out


def prepare_prompt(model: "Model", prompt: str, images: Any = None, raw: bool = False
                   ) -> tuple[list[int], np.ndarray | None]:
    """(token ids, prompt embeddings [1, n, H] with the image rows merged in, or None without images)."""
    from edge.runtime.image import load_image, tile_grid, preprocess

    images = _as_list(images)
    check_text(prompt)
    if model.vision is None:
        if images:
            raise ImageError(f"{model.bundle.path}: this bundle is text-only (no vision encoder); "
                             f"it cannot take images. Export a vision-language model (SmolVLM / Idefics3)")
        return model.encode_prompt(prompt, raw=raw), None
    if not prompt and not images:
        raise PromptError("prompt is empty")
    if len(prompt) > model.tokenizer.max_token_chars * model.max_context:  # refused before tokenizing
        raise PromptError(f"prompt of {len(prompt)} characters cannot fit in the bundle's context of "
                          f"{model.max_context} tokens; shorten the prompt or export with a larger --context")
    if len(images) > MAX_IMAGES:
        raise ImageError(f"{len(images)} images in one prompt; at most {MAX_IMAGES}")
    cfg = model.vision.cfg
    loaded = [load_image(im, f"image {i + 1}") for i, im in enumerate(images)]
    plans = [tile_grid(*im.size, cfg) for im in loaded]
    if raw:
        count = prompt.count(cfg.image_token)
        if count == 0:
            prompt = cfg.image_token * len(images) + prompt
        elif count != len(images):
            raise PromptError(f"the prompt has {count} {cfg.image_token} placeholders but {len(images)} images "
                              f"were given; use one per image, or none to put the images first")
        pieces = [(prompt, False)]
    else:
        pieces = _chat_pieces(model, prompt, len(images))
    ids = model.tokenizer.encode_pieces(_expand(pieces, plans, cfg))
    n_image = sum(p.tiles for p in plans) * cfg.tokens_per_tile
    if len(ids) >= model.max_context:
        detail = f" ({n_image} of them for {len(images)} image(s): {sum(p.tiles for p in plans)} tiles x " \
                 f"{cfg.tokens_per_tile} tokens)" if images else ""
        raise PromptError(f"prompt has {len(ids)} tokens{detail} but the bundle's context holds {model.max_context} "
                          f"(at most {model.max_context - 1} prompt tokens); use fewer images (every image is resized to "
                          f"{cfg.longest_edge} px, so its token count depends on its aspect ratio, not its size), "
                          f"a shorter prompt, or export with a larger --context")
    positions = np.flatnonzero(np.asarray(ids) == cfg.image_token_id)
    if len(positions) != n_image:
        raise PromptError(f"the prompt holds {len(positions)} image tokens but its images need {n_image}; "
                          f"does the text spell {cfg.image_token!r} or the chat template add one?")
    embeds = model.embed(ids)
    if images:
        tiles = np.concatenate([preprocess(im, cfg)[0] for im in loaded])
        feats = model.vision.encode(tiles)
        embeds[0, positions] = feats.reshape(-1, feats.shape[-1])
    return ids, embeds
