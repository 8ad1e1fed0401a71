"""A whole conversation as a prompt: token ids, one key per row (what a cached row holds, for
prefix reuse) and the prompt embeddings from any row on, images merged in.

Messages are ``{"role": ..., "content": ...}`` where content is a str or a list of parts
``{"type": "text", "text": str}`` / ``{"type": "image", "image": path | bytes | array | PIL image}``
(images: vision bundles only). A text row's key is its token id; an image row's key is (digest of
the image's pixels, row number within the image), so two prompts share a cached image row only if
they hold the same image there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Hashable, Sequence

import numpy as np

from edge.errors import ImageError, PromptError

from edge.runtime.tokenizer import check_message_list, check_role, check_text

if TYPE_CHECKING:
    from edge.runtime.model import Model

MAX_IMAGES = 64  # per conversation (as runtime/vision.py per prompt)


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    keys: tuple[Hashable, ...]
    images: tuple = ()  # LoadedImage, in prompt order
    plans: tuple = ()   # their TileGrids

    def __len__(self) -> int:
        return len(self.ids)

    def embeds_from(self, model: "Model", start: int) -> np.ndarray | None:
        """Embeddings [1, n - start, H] of rows [start, n) with image features in their rows, or None
        when those rows hold no image (their token ids are all a prefill needs). Only the images
        with a row at or after ``start`` go through the vision encoder."""
        if not self.images:
            return None
        ids = np.asarray(self.ids)
        positions = np.flatnonzero(ids == model.vision.cfg.image_token_id)
        if not positions.size or positions[-1] < start:
            return None
        from edge.runtime.image import preprocess

        cfg = model.vision.cfg
        counts = [p.tiles * cfg.tokens_per_tile for p in self.plans]
        bounds = np.cumsum([0] + counts)
        needed = [k for k in range(len(self.images)) if positions[bounds[k + 1] - 1] >= start]
        feats = model.vision.encode(np.concatenate([preprocess(self.images[k], cfg)[0] for k in needed]))
        feats = feats.reshape(-1, feats.shape[-1])
        embeds = model.embed(self.ids[start:])
        off = 0
        for k in needed:
            rows = positions[bounds[k]:bounds[k + 1]]
            keep = rows >= start
            embeds[0, rows[keep] - start] = feats[off:off + counts[k]][keep]
            off += counts[k]
        return embeds


def text_prompt(ids: Sequence[int]) -> Prompt:
    ids = tuple(int(i) for i in ids)
    return Prompt(ids, ids)


def split_image_markers(text: str, images: Sequence[Any], image_token: str) -> list[dict[str, Any]]:
    """A user turn's text + images as content parts: ``<image>`` in the text marks where each image
    goes (one per image); without any, the images come first (as ``Model.stream``)."""
    segments = text.split(image_token)
    if len(segments) == 1:
        segments = [""] * len(images) + segments
    elif len(segments) - 1 != len(images):
        raise PromptError(f"the message has {len(segments) - 1} {image_token} placeholders but {len(images)} "
                          f"images were given; use one per image, or none to put the images first")
    parts: list[dict[str, Any]] = []
    for k, seg in enumerate(segments):
        if k:
            parts.append({"type": "image", "image": images[k - 1]})
        if seg:
            parts.append({"type": "text", "text": seg})
    return parts


def _parts(messages: Any) -> list[tuple[str, list[tuple[str, Any]]]]:
    """(role, [("text", str) | ("image", obj)]) per message, every field checked."""
    out = []
    for i, m in enumerate(check_message_list(messages)):
        check_role(i, m)
        content = m.get("content")
        if isinstance(content, str):
            out.append((m["role"], [("text", check_text(content, f"messages[{i}].content"))]))
            continue
        if not isinstance(content, (list, tuple)):
            raise PromptError(f"messages[{i}].content must be a str or a list of parts, got {type(content).__name__}")
        parts = []
        for j, p in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text":
                parts.append(("text", check_text(p.get("text"), f"{where}.text")))
            elif kind == "image":
                parts.append(("image", p.get("image")))
            else:
                raise PromptError(f"{where} must be {{'type': 'text', 'text': ...}} or {{'type': 'image', 'image': ...}}")
        out.append((m["role"], parts))
    return out


def chat_prompt(model: "Model", messages: Any, add_generation_prompt: bool = True) -> Prompt:
    """The bundle's chat template over ``messages``. Text in a message that spells a control token
    stays plain text (``Tokenizer.encode_chat``'s rule)."""
    parsed = _parts(messages)
    n_images = sum(kind == "image" for _, parts in parsed for kind, _ in parts)
    if model.vision is None:
        if n_images:
            raise ImageError(f"{model.bundle.path}: this bundle is text-only (no vision encoder); it cannot take images")
        flat = [{"role": role, "content": "".join(text for _, text in parts)} for role, parts in parsed]
        return text_prompt(model.tokenizer.encode_chat(flat, add_generation_prompt))
    return _vision_prompt(model, parsed, n_images, add_generation_prompt)


def _vision_prompt(model: "Model", parsed, n_images: int, add_generation_prompt: bool) -> Prompt:
    from edge.runtime.image import load_image, tile_grid
    from edge.runtime.vision import _expand

    if n_images > MAX_IMAGES:
        raise ImageError(f"{n_images} images in one conversation; at most {MAX_IMAGES}")
    cfg, tok = model.vision.cfg, model.tokenizer
    texts: list[str] = []
    images = []
    listed_msgs, inline_msgs = [], []
    for role, parts in parsed:
        listed, inline = [], ""
        for kind, value in parts:
            if kind == "image":
                images.append(load_image(value, f"image {len(images) + 1}"))
                listed.append({"type": "image"})
                inline += cfg.image_token
            else:
                listed.append({"type": "text", "text": tok.slot(len(texts))})
                inline += tok.slot(len(texts))
                texts.append(value)
        if not listed:
            listed.append({"type": "text", "text": tok.slot(len(texts))})
            inline += tok.slot(len(texts))
            texts.append("")
        listed_msgs.append({"role": role, "content": listed})
        inline_msgs.append({"role": role, "content": inline})
    # list content (SmolVLM's template), else a template that takes only strings: image tokens inline
    for held in (listed_msgs, inline_msgs):
        pieces, found, skeleton = tok.template_pieces(held, texts, add_generation_prompt)
        printed_list = "'type'" in skeleton or '"type"' in skeleton
        if found == list(range(len(texts))) and skeleton.count(cfg.image_token) == n_images and not printed_list:
            break
    else:
        raise PromptError("the bundle's chat template does not render these messages (text or image tokens missing "
                          "from its output)")
    plans = [tile_grid(*im.size, cfg) for im in images]
    ids = tok.encode_pieces(_expand(pieces, plans, cfg))
    n_rows = sum(p.tiles for p in plans) * cfg.tokens_per_tile
    positions = np.flatnonzero(np.asarray(ids) == cfg.image_token_id)
    if len(positions) != n_rows:
        raise PromptError(f"the prompt holds {len(positions)} image tokens but its images need {n_rows}; "
                          f"does a message spell {cfg.image_token!r}?")
    keys: list[Hashable] = list(ids)
    off = 0
    for im, plan in zip(images, plans):
        digest = _digest(im)
        count = plan.tiles * cfg.tokens_per_tile
        for j, pos in enumerate(positions[off:off + count]):
            keys[pos] = (digest, j)
        off += count
    return Prompt(tuple(ids), tuple(keys), tuple(images), tuple(plans))


def _digest(image) -> str:
    img = image.image
    h = hashlib.sha256(f"{img.mode}:{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    if image.palette:
        h.update(bytes(image.palette))
    return h.hexdigest()
