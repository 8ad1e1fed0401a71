"""edge-export's pipeline as named steps: load -> quantize (calibrate + plan) -> build graphs ->
write bundle -> verify (measure the bundle as written), the whole bundle written atomically."""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import onnx

import edge
from edge.config import DecoderConfig, ExportOptions
from edge.manifest import FORMAT_VERSION, MANIFEST_NAME, GraphSpec, Manifest, TensorSpec, file_record
from edge.plans import CpuPlan, Plans
from edge.budget import check_context, check_memory, estimate_for
from edge.errors import ModelSourceError
from edge.progress import Progress
from edge.vision import VisionConfig

from edge.export.bundle_writer import write_atomically
from edge.export.checks import check_tokenizer
from edge.export.target import check_target, check_writable_parent
from edge.export.families import Family, family_for
from edge.export.graph.cpu_decoder import CPU_SCHEMES, CpuDecoderGraph
from edge.export.graph.builder import WeightStore, io_specs
from edge.export.graph.split import build_split
from edge.export.graph.vision import build_vision_graph
from edge.export.quant.recipe import (CPU_CHUNK, FLOAT, AccuracySpec, CalibrationSpec, calibrate_and_plan,
                                      decode_accuracy, decoders)
from edge.export.quant.accuracy import texts_accuracy
from edge.export.quant.plan import QuantOptions, QuantPlan
from edge.export.quant.vision import vision_linear
from edge.export.sources import SourceModel, load_source

if TYPE_CHECKING:
    from edge.export.quant.calibrate import Calibration

TOKENIZER_FILE = "tokenizer.json"


def _external_files(model: onnx.ModelProto) -> tuple[str, ...]:
    """Files the graph's tensors live in (recorded so the runtime can check them before loading)."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return tuple(sorted({e.value for t in _get_all_tensors(model) if uses_external_data(t)
                         for e in t.external_data if e.key == "location"}))


def _graph_spec(model: onnx.ModelProto, file: str, role: str) -> GraphSpec:
    ins, outs = io_specs(model)
    spec = lambda d: TensorSpec(d["name"], d["dtype"], tuple(d["shape"]))  # noqa: E731
    return GraphSpec(file=file, role=role, dtype="float32", inputs=tuple(map(spec, ins)), outputs=tuple(map(spec, outs)),
                     external_data=_external_files(model))


@dataclass(frozen=True)
class Loaded:
    """Step 1: the source as the family reads it."""
    source: SourceModel
    family: Family
    cfg: DecoderConfig
    weights: Mapping[str, np.ndarray]
    vision: VisionConfig | None


@dataclass(frozen=True)
class Quantized:
    """Steps 2-3: the quantization plan (None for a float bundle) and what calibration saw."""
    plan: QuantPlan | None = None
    calibration: dict[str, Any] | None = None


@dataclass(frozen=True)
class Built:
    """Step 4: every graph (key -> proto, file, role), the weights they share, the manifest parts."""
    store: WeightStore
    graphs: dict[str, tuple[onnx.ModelProto, str, str]]
    quant_record: dict[str, Any]
    plans: Plans
    vision: VisionConfig | None


def steps(quantized: bool, calibrated: bool = False, measured: bool = False) -> int:
    """How many progress stages an export shows: load, [calibrate, plan], build, write, [measure]."""
    return 3 + (quantized and not calibrated) + quantized + measured


def load(model: str | Path, options: ExportOptions, progress: Progress) -> Loaded:
    """Read the source and check it: config values, every expected tensor at its shape, the
    tokenizer round trip, the context against the trained positions (export/checks.py)."""
    with progress.stage(f"loading {model}"):
        source = load_source(model)
        family = family_for(source.architecture)
        cfg = _decoder_config(family, source)
        check_context(options.max_context, "--context", _trained_positions(source))
        check_tokenizer(source.tokenizer_json, source.chat_template, cfg, _origin(source, "tokenizer.json"))
        weights = _sanitize(family, source, cfg)
        vision = family.vision(source, cfg) if family.vision else None  # multimodal: image side
    progress.note(f"{family.name}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
                  f"{sum(w.size for w in weights.values()) / 1e6:.1f}M parameters")
    return Loaded(source, family, cfg, weights, vision)


def quantize(m: Loaded, options: ExportOptions, quant: QuantOptions, calibration: CalibrationSpec,
             progress: Progress, calibrated: "Calibration | None" = None) -> Quantized:
    """Calibrate (unless ``calibrated`` is given) and plan every linear's quantization."""
    if not calibrates(quant, options):  # only the static W8A8 graphs need calibration
        return Quantized()
    plan, cal = calibrate_and_plan(m.cfg, m.weights, m.source.tokenizer_json, m.source.chat_template, options, quant,
                                calibration, progress, calibrated)
    return Quantized(plan, {"text": calibration.label, "tokens": cal.tokens, "window": calibration.window,
                            "domains": cal.domains})


def build_graphs(m: Loaded, options: ExportOptions, quant: QuantOptions, q: Quantized, progress: Progress) -> Built:
    with progress.stage(f"building graphs ({', '.join(options.plans)}; chunk {options.chunk_length}, "
                        f"context {options.max_context})"):
        store = WeightStore()
        graphs: dict[str, tuple[onnx.ModelProto, str, str]] = {}
        record: dict[str, Any] = {}
        cpu_plan = None
        if "cpu" in options.plans:  # one fused-kernel graph for prompt and decode, from the float/GGUF weights
            kv = options.cpu_kv(CPU_SCHEMES[quant.cpu].quantized)
            cpu = CpuDecoderGraph(m.cfg, m.weights, store, options.max_context, quant.cpu, m.source.blocks, kv)
            graphs["cpu"] = (cpu.build(), "cpu.onnx", "cpu")
            graphs["cpu_embed"] = (cpu.build_embed(), "cpu_embed.onnx", "embed")
            cpu_plan = CpuPlan(linears=quant.cpu, chunk=min(CPU_CHUNK, options.max_context), kv=kv)
            record["cpu"] = cpu.record()
        split_plan = None
        if "fused" in options.plans:
            parts = decoders(m.cfg, m.weights, store, options.max_context, quant, q.plan, m.source.blocks)
            graphs.update({
                "embed": (parts.embed(), "embed.onnx", "embed"),
                "prefill": (parts.prefill.build("prefill", options.chunk_length, "past_len", logits_rows=True),
                            "prefill.onnx", "prefill"),
                "decode": (parts.decode.build("decode", 1, "past_len"), "decode.onnx", "decode"),
            })
            record.update(parts.record)
            if "split" in options.plans:  # per-layer subgraphs for a CPU + accelerator prefill (same weights)
                split_graphs, split_plan = build_split(parts.prefill, options.chunk_length)
                graphs.update({k: (proto, f"{k}.onnx", "split") for k, proto in split_graphs.items()})
        vision = m.vision
        if vision is not None:  # image tiles -> image-token embeddings, merged into the prompt by the runtime
            vision = dataclasses.replace(vision, linear_weights=options.vision_weights)
            graphs["vision"] = (build_vision_graph(vision, m.weights, store, vision_linear(options.vision_weights)),
                                "vision.onnx", "vision")
    if q.calibration:
        record["calibration"] = q.calibration
    return Built(store, graphs, record, Plans(default="cpu" if cpu_plan else "fused", split=split_plan,
                                              cpu=cpu_plan, fused="fused" in options.plans), vision)


def write_bundle(folder: Path, m: Loaded, options: ExportOptions, b: Built) -> Manifest:
    """Every file into ``folder`` (the writer's private folder), the manifest last."""
    b.store.write(folder)
    for proto, file, _ in b.graphs.values():
        onnx.save_model(proto, str(folder / file))
    (folder / TOKENIZER_FILE).write_text(m.source.tokenizer_json, encoding="utf-8")
    manifest = Manifest(
        model=m.cfg,
        chunk_length=options.chunk_length,
        max_context=options.max_context,
        graphs={k: _graph_spec(proto, file, role) for k, (proto, file, role) in b.graphs.items()},
        tokenizer={"file": TOKENIZER_FILE, "chat_template": m.source.chat_template},
        files={p.name: file_record(p) for p in sorted(folder.iterdir())},
        exporter={"name": "edge", "version": edge.__version__, "onnx": onnx.__version__,
                  "python": platform.python_version()},
        source=m.source.identity,
        quantization=b.quant_record,
        format_version=FORMAT_VERSION,
        plans=b.plans,
        vision=b.vision,
    )
    (folder / MANIFEST_NAME).write_text(manifest.dumps(), encoding="utf-8")
    return manifest


def verify(folder: Path, manifest: Manifest, m: Loaded, options: ExportOptions, quant: QuantOptions,
           q: Quantized, accuracy: AccuracySpec, progress: Progress) -> Manifest:
    """The bundle as written, loaded by the runtime plan by plan and measured against float
    (perplexity, stored in the manifest), before it replaces the target."""
    from edge.runtime.model import Model
    from edge.runtime.perplexity import heldout_text

    rec: dict[str, Any] = {}
    reference: dict[str, float] = {}  # float perplexity per text, measured once for every plan
    with progress.stage("measuring perplexity (bundle vs float, per text)"):
        if _fused_quantized(quant, options):  # the split plan runs these very linears
            fused = Model.load(folder, verify_hashes=False, plan="fused")
            rec["fused"] = texts_accuracy(m.cfg, m.weights, fused, options.chunk_length, accuracy.tokens,
                                          accuracy.window, progress, reference, f"fused plan ({quant.prefill})")
            if quant.decode != "fp32":
                window = min(accuracy.window, fused.max_context)
                rec["decode_weights"] = decode_accuracy(
                    m.cfg, m.weights, fused.tokenizer.encode(heldout_text()), quant, q.plan, options.chunk_length,
                    dataclasses.replace(accuracy, window=window), reference["pydoc-heldout"], progress,
                    m.source.blocks)
        if "cpu" in options.plans and quant.cpu != "fp32":
            rec["cpu"] = texts_accuracy(m.cfg, m.weights, Model.load(folder, verify_hashes=False, plan="cpu"),
                                        options.chunk_length, accuracy.tokens, accuracy.window, progress, reference,
                                        f"cpu plan ({quant.cpu})")
    manifest = dataclasses.replace(manifest, quantization={**manifest.quantization, "accuracy": rec})
    (folder / MANIFEST_NAME).write_text(manifest.dumps(), encoding="utf-8")
    return manifest


def _fused_quantized(quant: QuantOptions, options: ExportOptions) -> bool:
    return "fused" in options.plans and (quant.quantized or quant.decode != "fp32")


def measures(quant: QuantOptions, accuracy: AccuracySpec, options: ExportOptions) -> bool:
    return accuracy.enabled and (_fused_quantized(quant, options) or ("cpu" in options.plans and quant.cpu != "fp32"))


def calibrates(quant: QuantOptions, options: ExportOptions) -> bool:
    return quant.quantized and "fused" in options.plans


def export_model(model: str | Path, out: str | Path, options: ExportOptions = ExportOptions(),
                 progress: Progress | None = None, quant: "QuantOptions | None" = None,
                 calibration: CalibrationSpec = CalibrationSpec(), accuracy: AccuracySpec = AccuracySpec(),
                 calibrated: "Calibration | None" = None) -> Manifest:
    """load -> quantize (calibrate + plan) -> build graphs -> write bundle -> verify, the bundle
    written atomically. ``quant`` None = float bundle; ``calibrated``: reuse a calibration."""
    quant = quant or FLOAT
    progress = progress or Progress(total_steps=steps(calibrates(quant, options), calibrated is not None,
                                                      measures(quant, accuracy, options)))
    out = Path(out)
    # the target first (before minutes of work): edge's to replace, not holding the model, writable
    check_target(out, [model] if Path(model).exists() else [])
    check_writable_parent(out)
    loaded = load(model, options, progress)
    check_target(out, source_paths(model, loaded.source))  # an alias's file too
    quantized = quantize(loaded, options, quant, calibration, progress, calibrated)
    built = build_graphs(loaded, options, quant, quantized, progress)
    need = estimate_for(loaded.cfg, options.max_context, options.chunk_length, built.store.nbytes,
                        built.plans.cache_element_bytes)
    progress.note(f"running the bundle needs {need.describe()}")
    warning = check_memory(need, f"bundle {out.name}", refuse=False)
    if warning:
        progress.note(warning)  # the bundle may be meant for a larger machine: the runtime refuses then
    written: list[Manifest] = []

    def fill(folder: Path) -> None:
        with progress.stage(f"writing bundle {out} ({built.store.nbytes / 1e6:.0f} MB of weights)"):
            manifest = write_bundle(folder, loaded, options, built)
        if measures(quant, accuracy, options):
            manifest = verify(folder, manifest, loaded, options, quant, quantized, accuracy, progress)
        written.append(manifest)

    write_atomically(out, fill, source_paths(model, loaded.source))
    return written[0]


def source_paths(model: str | Path, source) -> list[Path]:
    """The files/folders an export reads (a target must not contain them)."""
    paths = [Path(model)] if Path(model).exists() else []
    if isinstance(source.identity.get("path"), str):
        paths.append(Path(source.identity["path"]))
    return paths


def _origin(source, name: str) -> str:
    path = source.identity.get("path", "")
    if source.identity.get("kind") == "gguf":
        return f"{path}: GGUF metadata ({name} rebuilt from it)" if name != "config" else f"{path}: GGUF metadata"
    return f"{Path(path) / name}" if path else name


def _decoder_config(family, source):
    """The family's config; a value the config record refuses names the file it came from."""
    try:
        return family.config(source.hf_config, source.special_tokens)
    except ModelSourceError as e:  # families name "config.json": say which one
        msg, path = str(e), source.identity.get("path")
        if source.identity.get("kind") == "hf-folder" and path and msg.startswith("config.json"):
            raise type(e)(f"{Path(path) / 'config.json'}{msg[len('config.json'):]}") from None
        raise
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise ModelSourceError(f"{_origin(source, 'config.json' if source.identity.get('kind') != 'gguf' else 'config')}: "
                               f"{e}") from None


def _sanitize(family, source, cfg):
    """The family's weights; a refusal names the source (and, for a GGUF, the metadata key it read)."""
    try:
        return family.sanitize(source.weights, cfg)
    except ModelSourceError as e:
        msg, path = str(e), source.identity.get("path", "")
        if source.identity.get("kind") == "gguf":
            arch = source.hf_config.get("model_type", "llama")
            msg = msg.replace("config.json num_hidden_layers", f"the GGUF metadata's {arch}.block_count")
        raise type(e)(f"{path}: {msg}" if path else msg) from None


def _trained_positions(source) -> int | None:
    cfg = source.hf_config
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    value = cfg.get("max_position_embeddings", text.get("max_position_embeddings"))
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None
