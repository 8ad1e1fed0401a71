"""A tiny random Idefics3 (SmolVLM layout) built locally with transformers: no hub, no real weights.

The folder looks like a real SmolVLM checkpoint: config.json + model.safetensors, tokenizer files
with the image tokens (<image>, <fake_token_around_image>, <global-img>, <row_i_col_j>,
<end_of_utterance>), preprocessor_config.json / processor_config.json and SmolVLM's chat template,
all written by transformers' own save_pretrained.

``tails="student_t"`` draws the vision encoder's and connector's matrices from a Student t
distribution (3 degrees of freedom, same std) instead of a normal one: heavier tails, closer to the
spread of trained weights (a few large values per row), which is what per-channel int8 rounding
is sensitive to. Still random weights: not a trained model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tiny_models import byte_level_tokenizer

# SmolVLM-Instruct's chat template (content is a list of {"type": "image"} / {"type": "text"} items)
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IMAGE_TOKENS = (["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
                + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
VOCAB = 320
TILE, PATCH, SCALE = 32, 4, 2  # 8 x 8 patches per tile -> 16 image tokens per tile
LONGEST_EDGE = 3 * TILE  # images become at most 3 x 3 tiles + the global one
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # per-channel values: normalization is really exercised
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def photos() -> dict[str, np.ndarray]:
    """Real sample photos (scikit-image): landscape, square, portrait, a 10:1 strip, a small crop;
    with the tiny model's 96-px longest edge they split into 2x3, 3x3, 3x2, 1x3 and 3x3 tiles."""
    from skimage import data

    coffee = data.coffee()  # 400 x 600
    return {
        "coffee_landscape": coffee,
        "astronaut_square": data.astronaut(),  # 512 x 512
        "chelsea_portrait": np.ascontiguousarray(data.chelsea().transpose(1, 0, 2)),  # 451 x 300
        "coffee_strip_10to1": np.ascontiguousarray(coffee[170:230]),  # 60 x 600 -> one row of tiles
        "coffee_small": np.ascontiguousarray(coffee[200:220, 300:327]),  # 20 x 27, upscaled
    }


def make_tiny_vlm(folder: Path, seed: int = 0, init_std: float = 0.2,
                  architecture: str = "Idefics3ForConditionalGeneration", tails: str = "normal") -> Path:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        PreTrainedTokenizerFast,
    )

    tok = byte_level_tokenizer(VOCAB)
    tok.add_special_tokens(IMAGE_TOKENS)
    assert tok.get_vocab_size() <= VOCAB
    image_token_id = tok.token_to_id("<image>")
    torch.manual_seed(seed)
    cfg = dict(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=TILE, patch_size=PATCH, initializer_range=init_std),
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=1024, initializer_range=init_std, bos_token_id=0, eos_token_id=2,
                         pad_token_id=0),
        scale_factor=SCALE, image_token_id=image_token_id, tie_word_embeddings=False)
    if architecture == "SmolVLMForConditionalGeneration":
        from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

        model = SmolVLMForConditionalGeneration(SmolVLMConfig(**cfg))
    else:
        model = Idefics3ForConditionalGeneration(Idefics3Config(**cfg))
    with torch.no_grad():  # random init, scaled so logits and image features are far from uniform
        for name, p in model.named_parameters():
            if "norm" in name:
                (p.uniform_(0.8, 1.2) if name.endswith("weight") else p.normal_(0, 0.1))
            elif p.dim() == 1:
                p.normal_(0, 0.1)
            elif tails == "student_t" and ("vision_model" in name or "connector" in name):
                t = torch.distributions.StudentT(3.0).sample(p.shape) / 3 ** 0.5  # unit variance
                p.copy_(t * init_std)
            else:
                p.normal_(0, init_std)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["rope_theta"] = 10000.0  # explicit (transformers 5.x writes rope_parameters)
    (folder / "config.json").write_text(json.dumps(config, indent=2))

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                   pad_token="<|im_end|>", unk_token=None)
    images = Idefics3ImageProcessor(size={"longest_edge": LONGEST_EDGE}, max_image_size={"longest_edge": TILE},
                                    image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor = Idefics3Processor(images, fast, image_seq_len=(TILE // PATCH // SCALE) ** 2,
                                  chat_template=SMOLVLM_TEMPLATE)
    processor.save_pretrained(folder)
    return folder


def load_processor(folder: Path):
    from transformers import Idefics3ImageProcessor, Idefics3Processor, PreTrainedTokenizerFast

    # the slow (numpy + PIL) image processor: the reference the runtime reproduces
    return Idefics3Processor(Idefics3ImageProcessor.from_pretrained(folder),
                             PreTrainedTokenizerFast.from_pretrained(folder),
                             image_seq_len=(TILE // PATCH // SCALE) ** 2,
                             chat_template=(folder / "chat_template.jinja").read_text()
                             if (folder / "chat_template.jinja").is_file() else SMOLVLM_TEMPLATE)
