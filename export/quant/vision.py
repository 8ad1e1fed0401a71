"""The vision graph's linears in int8, and a numpy reference of the vision graph to check them.

Forms (``--vision-weights``, recorded as ``vision.linear_weights`` in the manifest):
- ``fp32``: float Gemm, as transformers computes it.
- ``int8``: weight-only, symmetric, one scale per output channel (reference.quantize_weight_int8);
  the int8 tensors replace the float ones in weights.bin (about 1/4 of the size). Emitted as
  linears.py's DQ -> MatMul: literally, float activations times the dequantized weights
  (``int8_np_linear``). onnxruntime's CPU EP (1.32, default optimizations) fuses each into an 8-bit
  MatMulNBits with accuracy_level 4, which also quantizes the activations on the fly: int8,
  symmetric, one scale per row and block of 32 input channels (``matmulnbits_np_linear``
  reproduces it to ~1e-6). Dynamic, so no calibration: nothing depends on the images a user sends.

W8A8 (static per-tensor int8 activations, the decoder's prefill form) is available from Python for
experiments: ``calibrate_w8a8`` takes activation ranges from tiles (real images) and returns plans
for linears.PlannedLinear. It is not an export option: it needs calibration images at export time
and loses more accuracy than weight-only int8 (see README, SmolVLM section).

``reference_image_embeds`` is the vision graph in numpy (float32), with any linear plugged in
(``fake_quant_linear`` gives the int8 formula): the reference the emitted graphs are tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from edge.export.quant.reference import ActQuant, LinearQuant, fake_quant_linear
from edge.vision import VISION_WEIGHTS, VisionConfig

from edge.export.graph.decoder import LinearEmitter, float_linear
from edge.export.quant.linears import int8_weight_linear
from edge.export.graph.vision import V, full_tile_position_ids

CONNECTOR_PROJ = "model.connector.modality_projection.proj"
EMITTERS: dict[str, LinearEmitter] = {"fp32": float_linear, "int8": int8_weight_linear}
assert set(EMITTERS) == set(VISION_WEIGHTS)

# numpy linear: (x [tokens, in], name, W [out, in], b [out] | None) -> y [tokens, out]
NumpyLinear = Callable[[np.ndarray, str, np.ndarray, "np.ndarray | None"], np.ndarray]


def vision_linear(scheme: str) -> LinearEmitter:
    """The LinearEmitter for every linear of the vision graph under ``scheme`` (one of VISION_WEIGHTS)."""
    try:
        return EMITTERS[scheme]
    except KeyError:
        raise ValueError(f"vision weights must be one of {', '.join(VISION_WEIGHTS)}, got {scheme!r}") from None


def vision_linear_names(cfg: VisionConfig) -> list[str]:
    """Every linear of the vision graph (HF names, without .weight/.bias), in graph order."""
    names = []
    for i in range(cfg.num_layers):
        p = f"{V}encoder.layers.{i}."
        names += [p + f"self_attn.{k}_proj" for k in ("q", "k", "v", "out")] + [p + "mlp.fc1", p + "mlp.fc2"]
    return names + [CONNECTOR_PROJ]


# ------------------------------------------------------------------ numpy reference of the vision graph


def float_np_linear(x: np.ndarray, name: str, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    y = x @ w.T
    return (y if b is None else y + b).astype(np.float32)


def int8_np_linear(x: np.ndarray, name: str, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """The int8 weight-only formula: x @ (q * scale[:, None])^T + b."""
    return fake_quant_linear(x, w, b, LinearQuant("int8"))


def dynamic_block_int8(x: np.ndarray, block: int = 32) -> np.ndarray:
    """x [tokens, in] fake-quantized as MatMulNBits' accuracy_level 4 does its input: per row and
    block of ``block`` channels, int8 with scale absmax / 127, round half to even."""
    t, k = x.shape
    kp = -(-k // block) * block
    xp = np.zeros((t, kp), np.float32)
    xp[:, :k] = x
    xb = xp.reshape(t, kp // block, block)
    scale = (np.abs(xb).max(-1, keepdims=True) / np.float32(127)).astype(np.float32)
    q = np.clip(np.rint(xb / np.where(scale > 0, scale, np.float32(1))), -127, 127)
    return (q * scale).reshape(t, kp)[:, :k].astype(np.float32)


def matmulnbits_np_linear(x: np.ndarray, name: str, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """What onnxruntime's CPU EP computes for the int8 form: int8 weights and int8 dynamic activations."""
    return int8_np_linear(dynamic_block_int8(x), name, w, b)


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return ((x - mu) / np.sqrt(var + np.float32(eps)) * w + b).astype(np.float32)


def _gelu(x: np.ndarray, act: str) -> np.ndarray:
    if act == "gelu":
        erf = np.frompyfunc(math.erf, 1, 1)
        return (0.5 * x * (1 + erf(x / math.sqrt(2)).astype(np.float32))).astype(np.float32)
    return (0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))).astype(np.float32)


def reference_image_embeds(cfg: VisionConfig, weights: Mapping[str, np.ndarray], tiles: np.ndarray,
                           linear: NumpyLinear = float_np_linear) -> np.ndarray:
    """tiles [T, 3, S, S] -> image embeddings [T, tokens_per_tile, text_hidden], as vision.onnx computes
    them (``linear`` computes every linear; it may record its inputs, see ``calibrate_w8a8``)."""
    w = weights
    t, p, d = len(tiles), cfg.patch_size, cfg.hidden_size
    side = cfg.patches_per_side
    n = side * side
    e = f"{V}embeddings"
    patches = tiles.astype(np.float32).reshape(t, cfg.num_channels, side, p, side, p).transpose(0, 2, 4, 1, 3, 5)
    conv = w[f"{e}.patch_embedding.weight"].reshape(d, -1)
    h = patches.reshape(t * n, -1) @ conv.T + w[f"{e}.patch_embedding.bias"]
    h = (h.reshape(t, n, d) + w[f"{e}.position_embedding.weight"][full_tile_position_ids(side)]).reshape(t * n, d)
    heads, hd = cfg.num_heads, d // cfg.num_heads

    def split(y: np.ndarray) -> np.ndarray:  # [t * n, d] -> [t, heads, n, hd]
        return y.reshape(t, n, heads, hd).transpose(0, 2, 1, 3)

    for i in range(cfg.num_layers):
        q = f"{V}encoder.layers.{i}."

        def lin(x: np.ndarray, name: str, q: str = q) -> np.ndarray:
            return linear(x, q + name, w[q + name + ".weight"], w[q + name + ".bias"])

        x = _layer_norm(h, w[q + "layer_norm1.weight"], w[q + "layer_norm1.bias"], cfg.layer_norm_eps)
        qh = split(lin(x, "self_attn.q_proj") * np.float32(hd ** -0.5))
        kh, vh = split(lin(x, "self_attn.k_proj")), split(lin(x, "self_attn.v_proj"))
        scores = qh @ kh.transpose(0, 1, 3, 2)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = (probs @ vh).transpose(0, 2, 1, 3).reshape(t * n, d)
        h = h + lin(ctx, "self_attn.out_proj")
        x = _layer_norm(h, w[q + "layer_norm2.weight"], w[q + "layer_norm2.bias"], cfg.layer_norm_eps)
        h = h + lin(_gelu(lin(x, "mlp.fc1"), cfg.hidden_act), "mlp.fc2")
    h = _layer_norm(h, w[f"{V}post_layernorm.weight"], w[f"{V}post_layernorm.bias"], cfg.layer_norm_eps)
    f, m = cfg.scale_factor, side // cfg.scale_factor  # pixel shuffle, the graph's reshapes
    h = h.reshape(t, side, m, d * f).transpose(0, 2, 1, 3).reshape(t, m, m, d * f * f)
    h = h.transpose(0, 2, 1, 3).reshape(t * m * m, d * f * f)
    out = linear(h, CONNECTOR_PROJ, w[CONNECTOR_PROJ + ".weight"], None)
    return out.reshape(t, m * m, cfg.text_hidden_size).astype(np.float32)


# ------------------------------------------------------------------ W8A8 (experiments, from Python)


def calibrate_w8a8(cfg: VisionConfig, weights: Mapping[str, np.ndarray], tiles: np.ndarray,
                   percentile: float = 100.0) -> dict[str, LinearQuant]:
    """Static per-tensor int8 activation scales for every vision linear from float runs on ``tiles``
    (clip = the given percentile of |x| at the linear's input); plans for linears.PlannedLinear."""
    seen: dict[str, list[np.ndarray]] = {}

    def record(x, name, w, b):
        seen.setdefault(name, []).append(np.abs(x).reshape(-1))
        return float_np_linear(x, name, w, b)

    for k in range(len(tiles)):
        reference_image_embeds(cfg, weights, tiles[k:k + 1], record)
    return {name: LinearQuant("int8", ActQuant.for_clip(float(np.percentile(np.concatenate(v), percentile))))
            for name, v in seen.items()}


def planned_np_linear(plans: Mapping[str, LinearQuant]) -> NumpyLinear:
    return lambda x, name, w, b: fake_quant_linear(x, w, b, plans[name])


# ------------------------------------------------------------------ the measure


def embedding_cosines(test: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine similarity per image-token embedding ([..., H] -> [...]), in float64."""
    a, b = np.asarray(test, np.float64), np.asarray(ref, np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
