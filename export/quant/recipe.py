"""Quantization inside edge-export: calibrate, plan, choose the graph builders, measure accuracy.

Prefill linears follow the plan (W8A8 / W8A16 + side paths) on the smoothed, GPTQ-rounded
weights. Decode:
- int8: int8 weight-only on the very tensors of the prefill graph (nothing added to the bundle);
- int4: MatMulNBits blocks of the original (unsmoothed) weights: for a GGUF Q4_1 source these
  reproduce the file's own weights exactly;
- fp32: float linears.
Whenever prefill is quantized, the token table and output projection are the CPU plan's 8-bit
blocks, shared by every graph (export/quant/decoder.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge.config import DecoderConfig, ExportOptions
from edge.progress import Progress
from edge.export.quant.reference import LinearQuant

from edge.export.quant import corpus
from edge.export.quant.corpus import Text
from edge.export.quant.accuracy import EVAL_TOKENS, EVAL_WINDOW, graph_perplexity
from edge.export.quant.calibrate import Calibration, calibrate
from edge.export.graph.builder import WeightStore
from edge.export.graph.decoder import DecoderGraph, LinearEmitter, build_embed_graph
from edge.export.quant.blocks import Blocks
from edge.export.quant.decoder import QuantDecoderGraph, build_block_embed_graph, table_lookup
from edge.export.quant.linears import DECODE_EMITTERS, PlannedLinear, ScopedStore
from edge.export.quant.plan import QuantOptions, QuantPlan, plan_quantization

FLOAT = QuantOptions(prefill="fp32", decode="fp32", cpu="fp32")
CALIB_TOKENS, CALIB_WINDOW = 32768, 512
HESSIAN_TOKENS = 8192  # GPTQ's second-moment matrices: a quarter of the budget (~25 s of calibration on 2 cores)
CPU_CHUNK = 128  # the CPU plan's most prompt tokens per call: bounds the activations (and GQA's score buffer)
INT4_ACCURACY_LEVEL = 4  # see linears.int4_linear


@dataclass(frozen=True)
class CalibrationSpec:
    texts: tuple[Text, ...] | None = None  # None: the default multi-domain corpus (export/quant/corpus)
    tokens: int = CALIB_TOKENS
    window: int = CALIB_WINDOW
    label: str = corpus.DEFAULT_LABEL
    hessian_tokens: int = HESSIAN_TOKENS  # of them, the first this many also give GPTQ's input moments


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


def calibration_windows(tokenizer_json: str, chat_template: str | None,
                        spec: CalibrationSpec) -> list[tuple[str, list[int]]]:
    """``spec.tokens`` tokens of calibration text in windows of ``spec.window`` (each run as a fresh
    context), taken from the corpus's domains in turn, as (domain, token ids). Chats use
    the model's template (its control tokens drive some channels far beyond plain text: x30 at
    some down_proj inputs of SmolLM2); without one they are plain "User:/Assistant:" text."""
    from edge.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_json_text(tokenizer_json, chat_template)
    texts = list(spec.texts) if spec.texts is not None else corpus.default_texts()
    if not chat_template:
        texts = [corpus.as_plain(t) for t in texts]
    return corpus.windows(texts, tok, spec.window, spec.tokens)


def calibrate_and_plan(cfg: DecoderConfig, weights: Mapping[str, np.ndarray], tokenizer_json: str,
                    chat_template: str | None, options: ExportOptions, quant: QuantOptions, spec: CalibrationSpec,
                    progress: Progress, calibration: Calibration | None = None) -> tuple[QuantPlan, Calibration]:
    if calibration is None:
        wins = calibration_windows(tokenizer_json, chat_template, spec)
        used = corpus.tokens_per_domain(wins)
        parts = ", ".join(f"{d} {n}" for d, n in used.items())
        hess = corpus.hessian_weights(wins, spec.hessian_tokens) if quant.rounding == "gptq" else None
        with progress.stage(f"calibrating on {sum(used.values())} tokens in {len(wins)} windows ({parts})"):
            calibration = calibrate(cfg, weights, [ids for _, ids in wins], chunk=min(options.chunk_length, spec.window),
                                    progress=progress, hessian=hess)
        calibration = dataclasses.replace(calibration, domains=used)
    with progress.stage("planning quantization (clip search, hot channels, smoothing)"):
        plan = plan_quantization(calibration, weights, quant, cfg.head_dim)
    progress.note(plan.summary())
    return plan, calibration


def decoders(cfg: DecoderConfig, weights: Mapping[str, np.ndarray], store: WeightStore, max_context: int,
             quant: QuantOptions, plan: QuantPlan | None, blocks: Mapping[str, Blocks] | None = None) -> Decoders:
    """``blocks``: the source's own block-quantized weights (GGUF), for the 8-bit table and head."""
    if plan is None:  # float prefill
        prefill = DecoderGraph(cfg, weights, store, max_context)
        embed = lambda: build_embed_graph(cfg, weights, store)
    else:
        prefill = QuantDecoderGraph(cfg, plan.weights, store, max_context, PlannedLinear(plan.linears()), blocks)
        embed = lambda: build_block_embed_graph(cfg, plan.weights, store, blocks)
    decode = decode_graph(cfg, weights, store, max_context, quant, plan, blocks)
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
                 quant: QuantOptions, plan: QuantPlan | None, blocks: Mapping[str, Blocks] | None = None) -> DecoderGraph:
    w = decode_weights(quant, weights, plan, cfg.head_dim)
    emit = decode_emitter(quant, w, weights)
    if plan is None:
        return DecoderGraph(cfg, w, ScopedStore(store, "decode"), max_context, linear=emit)
    # int8 shares every tensor with prefill; otherwise norms differ from prefill's smoothed ones
    target = store if quant.decode == "int8" else ScopedStore(store, "decode")
    return QuantDecoderGraph(cfg, w, target, max_context, emit, blocks)


def manifest_record(quant: QuantOptions, plan: QuantPlan | None) -> dict[str, Any]:
    rec: dict[str, Any] = {"prefill": quant.prefill, "decode": quant.decode}
    if plan is not None:
        rec.update({
            "weights": "int8, symmetric, one scale per output channel, stored transposed [in, out] "
                       "(DequantizeLinear axis 1)",
            "activations": "static per-tensor symmetric QDQ, uint8 zero point 128; bits 16 = two int8 passes "
                           "(hi = QDQ(x, scale), lo = QDQ(x - hi, scale / 254)), each its own int8 GEMM",
            "token_table": "8-bit blocks of 32 (a GGUF Q8_0 table as stored), the CPU plan's tensors: "
                           "GatherBlockQuantized lookup; the output projection MatMulNBits on them (CPU lane, "
                           "float activations)",
            "options": {"outliers": quant.outliers, "outlier_layers": quant.outlier_layers,
                        "hot_budget": quant.hot_budget, "smooth": quant.smooth, "act16": list(quant.act16),
                        **({"act16_budget": quant.act16_budget} if quant.act16_auto else {}),
                        "float_linears": quant.float_groups, "weight_rounding": quant.rounding},
            **plan.record(),
        })
    if quant.decode != "fp32":
        rec["decode_weights"] = ({"scheme": "int4", "block": quant.block, "form": "MatMulNBits bits=4, zero point 0, "
                                  "plus per-block offset (w = scale * q + offset, GGUF Q4_1's form)",
                                  "accuracy_level": INT4_ACCURACY_LEVEL} if quant.decode == "int4" else
                                 {"scheme": "int8", "form": "DequantizeLinear -> MatMul on the prefill's int8 weights"})
    return rec


def decode_accuracy(cfg: DecoderConfig, weights: Mapping[str, np.ndarray], ids: list[int], quant: QuantOptions,
                    plan: QuantPlan | None, chunk: int, spec: AccuracySpec, float_ppl: float,
                    progress: Progress, blocks: Mapping[str, Blocks] | None = None) -> dict[str, Any]:
    """Perplexity of the decode graph's weights (its graph in prefill form, chunked as the runtime
    chunks) on the held-out text ``ids``, against ``float_ppl`` measured the same way."""
    table = table_lookup(cfg, weights, blocks) if plan else None
    w = decode_weights(quant, weights, plan, cfg.head_dim)
    dec = graph_perplexity(cfg, w, ids, chunk, linear=decode_emitter(quant, w, weights), lookup=table,
                           label=f"decode weights ({quant.decode})", graph=QuantDecoderGraph if plan else DecoderGraph,
                           tokens=spec.tokens, window=spec.window, progress=progress,
                           **({"blocks": blocks} if plan else {}))
    return {"scheme": quant.decode, "text": "pydoc-heldout", "perplexity": round(dec.perplexity, 4),
            "change_percent": round(100 * (dec.perplexity / float_ppl - 1), 3)}
