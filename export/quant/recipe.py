"""Quantization inside edge-export: calibrate, plan, choose the graph builders, measure accuracy.

Prefill linears follow the plan (W8A8 / W8A16 + side paths) on the smoothed weights. Decode:
- int8: int8 weight-only on the very tensors of the prefill graph (nothing added to the bundle);
- int4: MatMulNBits blocks of the original (unsmoothed) weights: for a GGUF Q4_1 source these
  reproduce the file's own weights exactly;
- fp32: float linears.
Whenever prefill is quantized, the token table and output projection are the shared int8 rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge.config import DecoderConfig, ExportOptions
from edge.progress import Progress
from edge.export.quant.reference import LinearQuant, dequantize_weight_int8, quantize_weight_int8

from edge.export.quant.accuracy import EVAL_TOKENS, EVAL_WINDOW, graph_perplexity, report
from edge.export.quant.calibrate import HEAD, Calibration, calibrate
from edge.export.graph.builder import WeightStore
from edge.export.graph.decoder import DecoderGraph, LinearEmitter, build_embed_graph
from edge.export.quant.decoder import TABLE, QuantDecoderGraph, build_int8_embed_graph
from edge.export.quant.linears import DECODE_EMITTERS, PlannedLinear, ScopedStore
from edge.export.quant.plan import QuantOptions, QuantPlan, plan_quantization

FLOAT = QuantOptions(prefill="fp32", decode="fp32", cpu="fp32")
CALIB_TOKENS, CALIB_WINDOW = 32768, 512
CPU_CHUNK = 128  # the CPU plan's most prompt tokens per call: bounds the activations (and GQA's score buffer)
INT4_ACCURACY_LEVEL = 4  # see linears.int4_linear


@dataclass(frozen=True)
class CalibrationSpec:
    text: str | None = None  # None: the first half of edge.runtime.perplexity.default_text()
    tokens: int = CALIB_TOKENS
    window: int = CALIB_WINDOW
    label: str = "pydoc_data.topics, first half"
    # every other window as a chat in the model's template: measured worse than plain text, even on
    # held-out text in chat form, so it is off by default (figures in docs/quantization.md)
    chats: bool = False


@dataclass(frozen=True)
class AccuracySpec:
    enabled: bool = True
    tokens: int = EVAL_TOKENS
    window: int = EVAL_WINDOW


@dataclass(frozen=True)
class Decoders:
    """The graph builders a bundle is made of, and what the manifest says about them."""

    prefill: DecoderGraph
    decode: DecoderGraph
    embed: Any  # () -> onnx.ModelProto
    record: dict[str, Any] = field(default_factory=dict)
    plan: QuantPlan | None = None


def calibration_windows(tokenizer_json: str, chat_template: str | None, spec: CalibrationSpec) -> list[list[int]]:
    """``spec.tokens`` tokens of calibration text in windows of ``spec.window``, each run as a fresh
    context. With ``spec.chats`` (and a template), every other window is a chat (user: first half,
    assistant: second half) in the model's own template, as prompts reach the model at runtime: its
    control tokens drive some channels far beyond plain text (x30 at some down_proj inputs of
    SmolLM2), yet the wider ranges this calibrates cost more than they save (see CalibrationSpec)."""
    from edge.runtime.perplexity import default_text, split_text
    from edge.runtime.tokenizer import Tokenizer

    text = spec.text if spec.text is not None else split_text(default_text())[0]
    tok = Tokenizer.from_json_text(tokenizer_json, chat_template)
    ids = tok.encode(text[: spec.tokens * 8], special=False)  # ~4 chars per token: 8 is plenty
    wins, pos, total = [], 0, 0
    while total < spec.tokens and pos < len(ids):
        piece = ids[pos:pos + spec.window]
        pos += len(piece)
        if spec.chats and chat_template and len(wins) % 2:
            words = tok.decode(piece)
            half = words.find(" ", len(words) // 2)
            half = len(words) // 2 if half < 0 else half
            piece = tok.encode_chat([{"role": "user", "content": words[:half].strip()},
                                     {"role": "assistant", "content": words[half:].strip()}],
                                    add_generation_prompt=False)[: spec.window]
        piece = piece[: spec.tokens - total]
        wins.append(piece)
        total += len(piece)
    return wins


def calibrate_and_plan(cfg: DecoderConfig, weights: Mapping[str, np.ndarray], tokenizer_json: str,
                    chat_template: str | None, options: ExportOptions, quant: QuantOptions, spec: CalibrationSpec,
                    progress: Progress, calibration: Calibration | None = None) -> tuple[QuantPlan, Calibration]:
    if calibration is None:
        wins = calibration_windows(tokenizer_json, chat_template, spec)
        form = "; half as chats" if spec.chats and chat_template else ""
        with progress.stage(f"calibrating on {sum(map(len, wins))} tokens ({spec.label}{form})"):
            calibration = calibrate(cfg, weights, wins, chunk=min(options.chunk_length, spec.window), progress=progress)
    with progress.stage("planning quantization (clip search, hot channels, smoothing)"):
        plan = plan_quantization(calibration, weights, quant, cfg.head_dim)
    progress.note(plan.summary())
    return plan, calibration


def decoders(cfg: DecoderConfig, weights: Mapping[str, np.ndarray], store: WeightStore, max_context: int,
             quant: QuantOptions, plan: QuantPlan | None) -> Decoders:
    if plan is None:  # float prefill
        prefill = DecoderGraph(cfg, weights, store, max_context)
        embed = lambda: build_embed_graph(cfg, weights, store)
        head: LinearQuant | None = None
    else:
        lin = plan.linears()
        head = lin.pop(HEAD, None)
        prefill = QuantDecoderGraph(cfg, plan.weights, store, max_context, PlannedLinear(lin), head)
        embed = lambda: build_int8_embed_graph(cfg, plan.weights, store)
    decode = decode_graph(cfg, weights, store, max_context, quant, plan)
    return Decoders(prefill, decode, embed, manifest_record(quant, plan), plan)


def decode_weights(quant: QuantOptions, weights: Mapping[str, np.ndarray], plan: QuantPlan | None,
                   head_dim: int) -> Mapping[str, np.ndarray]:
    """The float weights the decode graph quantizes: the prefill's (int8: the very same tensors),
    else the originals (int4 of a Q4_1 source is then exact) with only the migrations that change
    what the shared KV cache holds (o_proj's, folded into v_proj)."""
    if plan is None:
        return weights
    return plan.weights if quant.decode == "int8" else plan.cache_consistent(weights, head_dim)


def decode_emitter(quant: QuantOptions, decode_w: Mapping[str, np.ndarray],
                   weights: Mapping[str, np.ndarray]) -> LinearEmitter:
    emit = DECODE_EMITTERS[quant.decode](quant.block)
    if quant.decode != "int4":
        return emit
    # int4 blocks give a Q4_1 source its own weights back exactly; a weight the migration changed
    # (v_proj/o_proj) would be re-quantized to 4 bits (a measurable loss, docs/quantization.md): those stay int8
    changed = {n.removesuffix(".weight") for n, a in decode_w.items() if n.endswith(".weight") and a is not weights.get(n)}
    return PlannedLinear({n: LinearQuant("int8") for n in changed}, default=emit)


def decode_graph(cfg: DecoderConfig, weights: Mapping[str, np.ndarray], store, max_context: int,
                 quant: QuantOptions, plan: QuantPlan | None) -> DecoderGraph:
    w = decode_weights(quant, weights, plan, cfg.head_dim)
    emit = decode_emitter(quant, w, weights)
    if plan is None:
        return DecoderGraph(cfg, w, ScopedStore(store, "decode"), max_context, linear=emit)
    # int8 shares every tensor with prefill; otherwise norms differ from prefill's smoothed ones
    target = store if quant.decode == "int8" else ScopedStore(store, "decode")
    return QuantDecoderGraph(cfg, w, target, max_context, emit, LinearQuant("int8"))


def cpu_record(linears: str, source_blocks: Mapping[str, Any]) -> dict[str, Any]:
    """What the CPU plan's linears are, for the manifest."""
    if linears == "fp32":
        return {"linears": "fp32", "form": "MatMul, float32"}
    kinds = sorted({f"{'Q4_1' if b.offset is not None else 'Q8_0'}" for b in source_blocks.values()})
    return {"linears": linears, "head": "int8",
            "form": f"MatMulNBits bits={linears[3:]} block 32, accuracy_level 4 (int8 compute, activations "
                    "quantized per block of 32 at run time); the tied token table read by GatherBlockQuantized "
                    "from the head's 8-bit blocks",
            "source_blocks": f"the source's own {', '.join(kinds)} blocks where their width matches"
                             if kinds else "none (float source: round to nearest, asymmetric blocks)"}


def manifest_record(quant: QuantOptions, plan: QuantPlan | None) -> dict[str, Any]:
    rec: dict[str, Any] = {"prefill": quant.prefill, "decode": quant.decode}
    if plan is not None:
        rec.update({
            "weights": "int8, symmetric, one scale per output channel, stored transposed [in, out] "
                       "(DequantizeLinear axis 1)",
            "activations": "static per-tensor symmetric QDQ, uint8 zero point 128; bits 16 = two int8 passes "
                           "(hi = QDQ(x, scale), lo = QDQ(x - hi, scale / 254)), each its own int8 GEMM",
            "token_table": "int8, one scale per token, stored [hidden, vocab] (the output projection's "
                           "tensor when tied)",
            "options": {"outliers": quant.outliers, "outlier_layers": quant.outlier_layers,
                        "hot_budget": quant.hot_budget, "smooth": quant.smooth, "act16": list(quant.act16),
                        **({"act16_budget": quant.act16_budget} if quant.act16_auto else {}),
                        "float_linears": quant.float_groups},
            **plan.record(),
        })
    if quant.decode != "fp32":
        rec["decode_weights"] = ({"scheme": "int4", "block": quant.block, "form": "MatMulNBits bits=4, zero point 0, "
                                  "plus per-block offset (w = scale * q + offset, GGUF Q4_1's form)",
                                  "accuracy_level": INT4_ACCURACY_LEVEL} if quant.decode == "int4" else
                                 {"scheme": "int8", "form": "DequantizeLinear -> MatMul on the prefill's int8 weights"})
    return rec


def measure(cfg: DecoderConfig, weights: Mapping[str, np.ndarray], bundle_model, quant: QuantOptions,
            plan: QuantPlan | None, chunk: int, spec: AccuracySpec, progress: Progress) -> dict[str, Any]:
    """Perplexities on the held-out text: the bundle's prefill (runtime, as written), the float
    model, and the decode weights scheme (its graph in prefill form, same chunking)."""
    from edge.runtime.perplexity import bundle_perplexity, heldout_text

    text = heldout_text()
    ids = bundle_model.tokenizer.encode(text)
    window = min(spec.window, bundle_model.max_context)  # as bundle_perplexity (and edge-eval) will
    kw = {"tokens": spec.tokens, "window": window, "progress": progress}
    got = bundle_perplexity(bundle_model, text, tokens=spec.tokens, window=window,
                            progress=lambda d, t: progress.bar(d, t, "quantized bundle"))
    ref = graph_perplexity(cfg, weights, ids, chunk, label="float reference", **kw)
    out = report(ref.perplexity, got.perplexity, text="pydoc_data.topics, second half (held out)",
                 tokens=got.tokens, window=window)
    if quant.decode != "fp32":
        table = dequantize_weight_int8(*quantize_weight_int8(weights[TABLE + ".weight"])) if plan else None
        w = decode_weights(quant, weights, plan, cfg.head_dim)
        dec = graph_perplexity(cfg, w, ids, chunk, linear=decode_emitter(quant, w, weights),
                               lookup=table, label=f"decode weights ({quant.decode})",
                               graph=QuantDecoderGraph if plan else DecoderGraph,
                               **({"head": LinearQuant("int8")} if plan else {}), **kw)
        out["decode_weights"] = {"scheme": quant.decode, "perplexity": round(dec.perplexity, 4),
                                 "change_percent": round(100 * (dec.perplexity / ref.perplexity - 1), 3)}
    return out
