"""A rotated residual stream for the CPU plan (QuaRot's offline rotation, numpy only).

An orthogonal Q [H, H] turns the residual stream h into h' = h Q. RMSNorm commutes with it
(rms(h Q) = rms(h)), so once every norm's weight g is folded into the linears that read it, the
model computes the same function in float:
- the linears fed by a norm (q|k|v, gate|up):   W' = W diag(g) Q
- the linears that write the stream (o, down):  W' = Q^T W   (and a bias b' = b Q)
- every norm's weight becomes 1; the graph rotates the input embeddings (one H x H MatMul) and
  maps the rows it scores back with Q^T diag(g_final) before the (unchanged, possibly tied) head.
Why: a norm-fed linear's input is then one unit-RMS row per token whose few large channels are
spread over all H, so ONE dynamic activation scale per call quantizes it to int8 within the
accuracy bound, and onnxruntime's fused int8 GEMM (DynamicQuantizeMatMul) runs it at ~5x the
speed of the block-scaled MatMulNBits at prompt chunks.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge.config import DecoderConfig


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _paley(q: int) -> np.ndarray:
    """Paley's construction I: a Hadamard matrix of order q + 1 for a prime q = 3 (mod 4)."""
    residues = {(a * a) % q for a in range(1, q)}
    chi = np.array([0] + [1 if a in residues else -1 for a in range(1, q)])
    s = np.zeros((q + 1, q + 1))
    s[0, 1:], s[1:, 0] = 1, -1
    s[1:, 1:] = chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]
    return s + np.eye(q + 1)


def hadamard(n: int) -> np.ndarray | None:
    """A Hadamard matrix of order n (entries +-1, H H^T = n I) as Paley(q) x Sylvester(2^k), or
    None where n has no such form (576 = 72 x 8, 960 = 480 x 2, 2048 = 2^11)."""
    for k in range(n.bit_length()):
        m = n >> k
        if m << k != n:
            break
        if m in (1, 2) or (_is_prime(m - 1) and (m - 1) % 4 == 3):
            h = np.array([[1.0]]) if m == 1 else np.array([[1.0, 1], [1, -1]]) if m == 2 else _paley(m - 1)
            for _ in range(k):
                h = np.block([[h, h], [h, -h]])
            return h
    return None


def stream_rotation(n: int, seed: int) -> tuple[np.ndarray, str]:
    """An orthogonal [n, n], float64, reproducible, and its kind for the manifest: a Hadamard
    matrix after random sign flips, scaled (it maps one large channel to n equal-magnitude ones),
    else Haar-random (QR of a Gaussian, signs fixed)."""
    rng = np.random.default_rng(seed)
    h = hadamard(n)
    if h is not None:
        return rng.choice([-1.0, 1.0], n)[:, None] * h / np.sqrt(n), "randomized Hadamard"
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :], "Haar-random orthogonal"


def rotate_weights(cfg: DecoderConfig, weights: Mapping[str, np.ndarray], q: np.ndarray) -> dict[str, np.ndarray]:
    """The decoder's float weights with the stream rotated by ``q`` (see the module doc): the
    layers' linears and norms and the final norm replaced (the head then reads unrotate(...) of
    the rows it scores); the tables and the head as given."""
    out = dict(weights)
    f64 = lambda name: np.asarray(weights[name], np.float64)  # noqa: E731
    f32 = lambda a: np.ascontiguousarray(a, np.float32)  # noqa: E731
    ones = np.ones(cfg.hidden_size, np.float32)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        for norm, readers in ((f"{p}.input_layernorm.weight", [f"{p}.self_attn.{t}_proj" for t in "qkv"]),
                              (f"{p}.post_attention_layernorm.weight", [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"])):
            g = f64(norm)
            for r in readers:
                out[r + ".weight"] = f32((f64(r + ".weight") * g[None, :]) @ q)
            out[norm] = ones
        for w in (f"{p}.self_attn.o_proj", f"{p}.mlp.down_proj"):
            out[w + ".weight"] = f32(q.T @ f64(w + ".weight"))
            if w + ".bias" in weights:
                out[w + ".bias"] = f32(f64(w + ".bias") @ q)
    out["model.norm.weight"] = ones
    return out


def unrotate(weights: Mapping[str, np.ndarray], q: np.ndarray) -> np.ndarray:
    """[H, H] that maps a normalized rotated row back and applies the final norm's weight:
    x' @ (Q^T diag(g)) = (x' Q^T) * g (``weights``: the unrotated ones)."""
    return np.ascontiguousarray(q.T * np.asarray(weights["model.norm.weight"], np.float64)[None, :], np.float32)

