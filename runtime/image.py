"""Image preprocessing for Idefics3 / SmolVLM bundles with numpy + Pillow only (no torch, no transformers).

Reproduces transformers' ``Idefics3ImageProcessor`` (the numpy + PIL one, which SmolVLM's processor
copies) step by step, so tile pixels match it exactly:

1. resize so the longest edge is ``longest_edge`` (aspect ratio kept, short side rounded up to even),
2. resize both sides up to multiples of the tile (``max_image_size``), split into row-major tiles and
   append the whole image resized to one tile (the "global" image); an image that already fits a
   tile stays one tile and gets no row/column markers,
3. RGBA is composited onto white, then rescale (1/255) and normalize (mean/std), channels first.

Inputs and their reference:
- a path or encoded bytes: decoded as ``transformers.image_utils.load_image`` does (EXIF
  orientation applied, converted to RGB);
- a PIL image or a uint8 numpy array [H, W] / [H, W, 1|3|4]: as the processor takes them directly
  (RGBA resized premultiplied then put on white; grey and palette images resized with NEAREST,
  as PIL does for the palette mode transformers gives them). Other PIL modes that convert cleanly
  (CMYK, YCbCr, LA, 1, ...) are converted to RGB/RGBA first (transformers mishandles those).
High-bit-depth modes (I, F, I;16) and other arrays are refused: their scaling to 8 bits is a choice
the caller must make.

The prompt side (``image_prompt_string``) is Idefics3Processor's token layout for one image.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edge.errors import ImageError
from edge.vision import VisionConfig

MAX_SIDE = 16384  # pixels: beyond this an image is refused before it is decoded
MAX_PIXELS = 1 << 26  # 67 MP
TRANSFORMERS_MAX_SIDE = 4096  # Idefics3ImageProcessor's MAX_IMAGE_SIZE
_TO_RGB = ("RGB", "CMYK", "YCbCr", "LAB", "HSV", "RGBX")
_TO_RGBA = ("LA", "PA", "RGBa")
_REFUSED = ("I", "F")  # + every "I;16*" mode


@dataclass(frozen=True)
class LoadedImage:
    """An image ready for the processor's steps: ``image`` is RGB, RGBA or L; L with a palette is a
    palette image (indices), L without one is grey."""

    image: Image.Image
    palette: list[int] | None = None

    @property
    def size(self) -> tuple[int, int]:  # (height, width)
        return self.image.height, self.image.width


# ---------------------------------------------------------------- loading


def _check_size(width: int, height: int, where: str) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"{where}: empty image ({width}x{height} pixels)")
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise ImageError(f"{where}: {width}x{height} pixels is too large (at most {MAX_SIDE} pixels a side and "
                         f"{MAX_PIXELS // 1_000_000} megapixels); downscale it first")


def _decode(source: Any, where: str) -> Image.Image:
    """Open a file or encoded bytes, check the size from the header, then decode fully."""
    try:
        img = Image.open(source)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{where}: too large to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        kind = "not a readable image file" if isinstance(e, UnidentifiedImageError) else "cannot be read"
        raise ImageError(f"{where}: {kind} ({e})") from None
    _check_size(img.width, img.height, where)
    try:
        img.load()
    except Exception as e:  # decoders raise OSError/SyntaxError/ValueError/struct.error on corrupt data
        raise ImageError(f"{where}: corrupt or truncated image data ({type(e).__name__}: {e})") from None
    return img


def _mode_to_working(img: Image.Image, where: str) -> LoadedImage:
    mode = img.mode
    if mode in ("RGB", "RGBA", "L"):
        return LoadedImage(img)
    if mode == "P":
        return LoadedImage(Image.fromarray(np.asarray(img), "L"), img.getpalette() or [])
    if mode in _REFUSED or mode.startswith("I;16"):
        raise ImageError(f"{where}: image mode {mode!r} (high bit depth) is not supported; "
                         f"convert it to 8-bit RGB first (e.g. scale to 0-255)")
    target = "RGBA" if mode in _TO_RGBA else "L" if mode == "1" else "RGB"
    try:
        return LoadedImage(img.convert(target))
    except (ValueError, OSError) as e:
        raise ImageError(f"{where}: image mode {mode!r} cannot be converted to {target} ({e})") from None


def _from_array(a: np.ndarray, where: str) -> LoadedImage:
    if a.dtype != np.uint8:
        raise ImageError(f"{where}: numpy image must be uint8 (0-255), got {a.dtype}; "
                         f"scale and convert it (e.g. (x * 255).round().astype(np.uint8))")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ImageError(f"{where}: numpy image must be [H, W], [H, W, 1], [H, W, 3] (RGB) or [H, W, 4] (RGBA), "
                         f"channels last; got shape {list(a.shape)}")
    _check_size(a.shape[1], a.shape[0], where)
    mode = "L" if a.ndim == 2 else ("RGB", "RGBA")[a.shape[-1] - 3]
    return LoadedImage(Image.fromarray(np.ascontiguousarray(a), mode))


def load_image(obj: Any, where: str = "image") -> LoadedImage:
    """A path, bytes, numpy array or PIL image -> LoadedImage (validated). Raises ImageError."""
    if isinstance(obj, LoadedImage):
        return obj
    if isinstance(obj, Image.Image):
        _check_size(obj.width, obj.height, where)
        try:
            obj.load()
        except Exception as e:
            raise ImageError(f"{where}: corrupt or truncated image data ({type(e).__name__}: {e})") from None
        return _mode_to_working(obj, where)
    if isinstance(obj, np.ndarray):
        return _from_array(obj, where)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        if len(obj) == 0:
            raise ImageError(f"{where}: empty bytes, not an image")
        img = _decode(io.BytesIO(bytes(obj)), where)
    elif isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        where = f"{where} {str(path)!r}"
        if not path.is_file():
            raise ImageError(f"{where}: no such file")
        img = _decode(path, where)
    else:
        raise ImageError(f"{where}: expected a file path, bytes, a numpy uint8 array or a PIL image, "
                         f"got {type(obj).__name__}")
    # as transformers.image_utils.load_image: EXIF orientation, then RGB
    if img.mode in _REFUSED or img.mode.startswith("I;16"):
        _mode_to_working(img, where)  # raises the clear error
    try:
        img = ImageOps.exif_transpose(img)
        return LoadedImage(img.convert("RGB"))
    except Exception as e:
        raise ImageError(f"{where}: cannot be converted to RGB ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------- sizes (Idefics3ImageProcessor's arithmetic)


def _rescale_to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect)
        if height % 2:
            height += 1
    else:
        height = max_len
        width = int(height * aspect)
        if width % 2:
            width += 1
    return max(height, 1), max(width, 1)


def _scale_below(height: int, width: int, max_len: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def _multiple_of_tile(height: int, width: int, tile: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


@dataclass(frozen=True)
class TileGrid:
    resized: tuple[int, int] | None  # (h, w) after the longest-edge resize, or None
    split: tuple[int, int]  # (h, w) the image is resized to before splitting (tile multiples)
    rows: int  # 0 and 0 when the image is one tile (no row/column markers)
    cols: int

    @property
    def tiles(self) -> int:
        return self.rows * self.cols + 1 if self.rows or self.cols else 1


def tile_grid(height: int, width: int, cfg: VisionConfig) -> TileGrid:
    resized = None
    if cfg.do_resize:
        resized = _scale_below(*_rescale_to_max_len(height, width, cfg.longest_edge), TRANSFORMERS_MAX_SIDE)
        height, width = resized
    tile = cfg.max_image_size
    if not cfg.do_image_splitting:
        return TileGrid(resized, (tile, tile), 0, 0)
    h, w = _multiple_of_tile(height, width, tile)
    if h > tile or w > tile:
        return TileGrid(resized, (h, w), math.ceil(h / tile), math.ceil(w / tile))
    return TileGrid(resized, (h, w), 0, 0)


# ---------------------------------------------------------------- pixels


def _resize(img: Image.Image, height: int, width: int, resample: int) -> Image.Image:
    # transformers hands 1-channel images to PIL as mode "P", which PIL always resizes with NEAREST
    return img.resize((width, height), Image.Resampling.NEAREST if img.mode == "L" else resample)


def _to_rgb(img: Image.Image, palette: list[int] | None) -> Image.Image:
    if img.mode == "RGB":
        return img
    if palette is not None:
        p = Image.fromarray(np.asarray(img), "P")
        p.putpalette(palette)
        img = p
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255)), rgba).convert("RGB")


def preprocess(image: LoadedImage, cfg: VisionConfig) -> tuple[np.ndarray, TileGrid]:
    """Tiles [T, 3, S, S] float32 (row-major crops, then the global image) and the tile plan."""
    img, resample = image.image, cfg.resample
    plan = tile_grid(img.height, img.width, cfg)
    if plan.resized is not None:
        img = _resize(img, *plan.resized, resample)
    tile = cfg.max_image_size
    img = _resize(img, *plan.split, resample)
    if plan.rows or plan.cols:
        frames = [img.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
                  for r in range(plan.rows) for c in range(plan.cols)]
        frames.append(_resize(img, tile, tile, resample))
    else:
        frames = [img]
    out = np.empty((len(frames), 3, tile, tile), np.float32)
    mean = np.asarray(cfg.image_mean, np.float32)
    std = np.asarray(cfg.image_std, np.float32)
    for i, f in enumerate(frames):
        x = np.asarray(_to_rgb(f, image.palette))
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32) if cfg.do_rescale else x.astype(np.float32)
        if cfg.do_normalize:
            x = (x - mean) / std
        out[i] = x.transpose(2, 0, 1)
    return out, plan


# ---------------------------------------------------------------- prompt layout (Idefics3Processor)


def image_prompt_string(plan: TileGrid, cfg: VisionConfig) -> str:
    image = cfg.image_token * cfg.tokens_per_tile
    fake, glob = cfg.fake_image_token, cfg.global_image_token
    if not (plan.rows or plan.cols):
        return f"{fake}{glob}{image}{fake}"
    text = ""
    for r in range(plan.rows):
        for c in range(plan.cols):
            text += f"{fake}<row_{r + 1}_col_{c + 1}>{image}"
        text += "\n"
    return text + f"\n{fake}{glob}{image}{fake}"

