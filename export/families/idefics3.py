"""Idefics3 / SmolVLM: SigLIP vision encoder + pixel-shuffle connector + LLaMA text decoder.

Hugging Face layout (transformers 4.5x ``Idefics3ForConditionalGeneration``; SmolVLM-256M/500M/
2.2B-Instruct ship as this architecture, SmolVLM2 as ``SmolVLMForConditionalGeneration``)::

    model.vision_model.embeddings.{patch_embedding,position_embedding}.*
    model.vision_model.encoder.layers.{i}.{layer_norm1,self_attn.{q,k,v,out}_proj,layer_norm2,mlp.fc{1,2}}.*
    model.vision_model.post_layernorm.*
    model.connector.modality_projection.proj.weight
    model.text_model.*  (a LlamaModel)   +   lm_head.weight

The text decoder is handed to the LLaMA family under LlamaForCausalLM names, so its graphs are the
very same as a text-only model's. Vision weights keep their names; export/graph/vision.py reads them.
Image preprocessing settings come from preprocessor_config.json / processor_config.json beside
config.json (defaults: Idefics3ImageProcessor's).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from edge.config import DecoderConfig
from edge.errors import UnsupportedModelError
from edge.vision import VisionConfig

from edge.export.checks import ConfigError, cfg_int, check_tensors
from edge.export.families import Family, llama, register

if TYPE_CHECKING:
    from edge.export.sources import SourceModel

TEXT_PREFIX = "model.text_model."
VISION_PREFIX = "model.vision_model."
CONNECTOR_WEIGHT = "model.connector.modality_projection.proj.weight"
ARCHITECTURES = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu")  # the first three are the tanh form
# Idefics3ImageProcessor / Idefics3Processor defaults, used when the folder has no processor files
DEFAULT_LONGEST_EDGE, DEFAULT_TILE = 4 * 364, 364
DEFAULT_MEAN = DEFAULT_STD = (0.5, 0.5, 0.5)
LANCZOS = 1
IMAGE_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN = "<image>", "<fake_token_around_image>", "<global-img>"
TILE_BATCH = 1  # tiles per vision-graph run: static shape, one tile at a time (NPU-friendly, low memory)


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise UnsupportedModelError("config.json: an Idefics3/SmolVLM config needs a text_config object")
    text = dict(text)
    text["architectures"] = list(cfg["architectures"])
    # transformers ties lm_head to the embeddings by the text config's flag
    tie = text.get("tie_word_embeddings")
    text["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False) if tie is None else tie)
    text.setdefault("rms_norm_eps", 1e-5)  # Idefics3Config's default text config
    return text


def idefics3_config(cfg: dict[str, Any], special: dict[str, Any]) -> DecoderConfig:
    text = _text_config(cfg)
    eos = list(special.get("eos_token_ids") or [])
    text_eos = text.get("eos_token_id")
    for e in [text_eos] if isinstance(text_eos, int) else list(text_eos or []):
        if e not in eos:
            eos.append(e)
    special = {**special, "eos_token_ids": eos, "bos_token_id": special.get("bos_token_id", text.get("bos_token_id"))}
    return llama.decoder_config(text, special, where="config.json text_config")


def sanitize(weights: Mapping[str, np.ndarray], cfg: DecoderConfig) -> dict[str, np.ndarray]:
    """Text weights renamed to the LLaMA layout (and checked by it); vision + connector as they are."""
    text, other, unknown = {}, {}, []
    for name, w in weights.items():
        if name.startswith(TEXT_PREFIX):
            text["model." + name[len(TEXT_PREFIX):]] = w
        elif name.startswith("lm_head."):
            text[name] = w
        elif name.startswith((VISION_PREFIX, "model.connector.")):
            other[name] = np.asarray(w, dtype=np.float32)  # checked against the vision config in vision_config
        else:
            unknown.append(name)
    if not text:
        raise UnsupportedModelError(f"weights: no {TEXT_PREFIX}* tensors; not an Idefics3/SmolVLM checkpoint")
    if unknown:
        raise UnsupportedModelError(f"weights: {len(unknown)} tensors an Idefics3/SmolVLM model does not use: "
                                    f"{', '.join(sorted(unknown)[:4])}; refusing to export a model without them")
    out = llama.sanitize(text, cfg, where=f"weights ({TEXT_PREFIX}*)")
    out.update(other)
    return out


def vision_weight_names(num_layers: int) -> list[str]:
    p = VISION_PREFIX
    names = [p + "embeddings.patch_embedding.weight", p + "embeddings.patch_embedding.bias",
             p + "embeddings.position_embedding.weight", p + "post_layernorm.weight", p + "post_layernorm.bias",
             CONNECTOR_WEIGHT]
    for i in range(num_layers):
        q = f"{p}encoder.layers.{i}."
        names += [q + f"{n}.{k}" for n in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2",
                                          "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                          "self_attn.out_proj") for k in ("weight", "bias")]
    return names


def vision_weight_shapes(layers: int, hidden: int, intermediate: int, channels: int, patch: int, image_size: int,
                         scale: int, text_hidden: int) -> dict[str, tuple[int, ...]]:
    """The SigLIP encoder + connector tensors and the shapes the vision config implies."""
    p, H, I = VISION_PREFIX, hidden, intermediate
    shapes = {p + "embeddings.patch_embedding.weight": (H, channels, patch, patch),
              p + "embeddings.patch_embedding.bias": (H,),
              p + "embeddings.position_embedding.weight": ((image_size // patch) ** 2, H),
              p + "post_layernorm.weight": (H,), p + "post_layernorm.bias": (H,),
              CONNECTOR_WEIGHT: (text_hidden, H * scale * scale)}
    per = {"layer_norm1": (H,), "layer_norm2": (H,), "mlp.fc1": (I, H), "mlp.fc2": (H, I),
           "self_attn.q_proj": (H, H), "self_attn.k_proj": (H, H), "self_attn.v_proj": (H, H),
           "self_attn.out_proj": (H, H)}
    for i in range(layers):
        q = f"{p}encoder.layers.{i}."
        for n, shape in per.items():
            shapes[q + n + ".weight"] = shape
            shapes[q + n + ".bias"] = (shape[0],)
    return shapes


def _edge(d: Any, name: str, default: int) -> int:
    if d is None:
        return default
    if not isinstance(d, dict) or not isinstance(d.get("longest_edge"), int):
        raise UnsupportedModelError(f"preprocessor_config.json: {name} must be {{'longest_edge': int}}, got {d!r:.80}")
    return int(d["longest_edge"])


def _token_id(vocab: dict[str, int], text: str) -> int:
    if text not in vocab:
        raise UnsupportedModelError(f"tokenizer.json: no {text!r} token; an Idefics3/SmolVLM tokenizer needs it")
    return vocab[text]


def vision_config(source: "SourceModel", dcfg: DecoderConfig) -> VisionConfig:
    cfg = source.hf_config
    v = cfg.get("vision_config")
    if not isinstance(v, dict):
        raise UnsupportedModelError("config.json: an Idefics3/SmolVLM config needs a vision_config object")
    act = v.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ACTIVATIONS:
        raise UnsupportedModelError(f"config.json: vision_config.hidden_act {act!r} is not supported ({', '.join(ACTIVATIONS)})")
    pre = source.extra_configs.get("preprocessor_config.json", {})
    proc = source.extra_configs.get("processor_config.json", {})
    tok = json.loads(source.tokenizer_json)
    vocab = dict(tok.get("model", {}).get("vocab") or {})
    vocab.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
    where = "config.json vision_config"
    image_size, patch = cfg_int(v, "image_size", where), cfg_int(v, "patch_size", where)
    hidden, layers = cfg_int(v, "hidden_size", where), cfg_int(v, "num_hidden_layers", where)
    intermediate, heads = cfg_int(v, "intermediate_size", where), cfg_int(v, "num_attention_heads", where)
    channels = cfg_int(v, "num_channels", where, default=3)
    scale = cfg_int(cfg, "scale_factor", "config.json", default=2)
    if hidden % heads:
        raise ConfigError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    if image_size % patch or (image_size // patch) % scale:
        raise ConfigError(f"{where}: image_size {image_size} / patch_size {patch} must be a whole number of "
                          f"patches, divisible by config.json scale_factor {scale}")
    side = image_size // patch
    tokens = (side // scale) ** 2 if scale else 0
    seq_len = proc.get("image_seq_len", tokens)
    if seq_len != tokens:
        raise UnsupportedModelError(
            f"processor_config.json: image_seq_len {seq_len} but the model makes {tokens} tokens per tile "
            f"(({image_size} / {patch}) ^ 2 / {scale} ^ 2)")
    image_token_id = _token_id(vocab, IMAGE_TOKEN)
    if cfg.get("image_token_id", image_token_id) != image_token_id:
        raise UnsupportedModelError(f"config.json: image_token_id {cfg['image_token_id']} but the tokenizer's "
                                    f"{IMAGE_TOKEN} is {image_token_id}")
    for i in range(1, 7):  # the processor's row/column markers; absent ones would tokenize as text
        for j in range(1, 7):
            _token_id(vocab, f"<row_{i}_col_{j}>")
    expected = vision_weight_shapes(layers, hidden, intermediate, channels, patch, image_size, scale, dcfg.hidden_size)
    held = {n: w for n, w in source.weights.items() if n.startswith((VISION_PREFIX, "model.connector."))}
    check_tensors(expected, held, "weights (vision)", layers, layers_field="config.json vision_config.num_hidden_layers")
    try:
        return VisionConfig(
            architecture=cfg["architectures"][0], image_size=image_size, patch_size=patch,
            num_channels=channels, hidden_size=hidden, intermediate_size=intermediate,
            num_layers=layers, num_heads=heads, layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)), hidden_act=act,
            scale_factor=scale, text_hidden_size=dcfg.hidden_size, tokens_per_tile=tokens, tile_batch=TILE_BATCH,
            do_convert_rgb=bool(pre.get("do_convert_rgb", True)), do_resize=bool(pre.get("do_resize", True)),
            longest_edge=_edge(pre.get("size"), "size", DEFAULT_LONGEST_EDGE),
            do_image_splitting=bool(pre.get("do_image_splitting", True)),
            max_image_size=_edge(pre.get("max_image_size"), "max_image_size", DEFAULT_TILE),
            resample=int(pre.get("resample", LANCZOS)), do_rescale=bool(pre.get("do_rescale", True)),
            rescale_factor=float(pre.get("rescale_factor", 1 / 255)), do_normalize=bool(pre.get("do_normalize", True)),
            image_mean=tuple(float(x) for x in _triple(pre.get("image_mean", DEFAULT_MEAN))),
            image_std=tuple(float(x) for x in _triple(pre.get("image_std", DEFAULT_STD))),
            image_token=IMAGE_TOKEN, image_token_id=image_token_id,
            fake_image_token=FAKE_IMAGE_TOKEN, fake_image_token_id=_token_id(vocab, FAKE_IMAGE_TOKEN),
            global_image_token=GLOBAL_IMAGE_TOKEN, global_image_token_id=_token_id(vocab, GLOBAL_IMAGE_TOKEN),
        )
    except (ValueError, ZeroDivisionError) as e:
        raise UnsupportedModelError(f"vision settings not supported: {e}") from None


def _triple(x: Any) -> list[float]:
    return [x] * 3 if isinstance(x, (int, float)) else list(x)


FAMILY = register(Family("idefics3", ARCHITECTURES, idefics3_config, sanitize, vision=vision_config))
