"""The one table of T5 architectures this project names: `random:<shape>` models, the training
presets, the benchmark shapes and the engine's test models all read it.

Each entry is the `config.json` of that architecture (the fields a Hugging Face `T5Config` takes),
so the same dict builds a transformers model (training), the engine's compact T5 (inference) or a
random-weight checkpoint folder (benchmarks). Weights are never part of a shape: a shape is a fair
stand-in for speed and memory, never for quality.

- flan-t5-small ... flan-t5-xl: the published Flan-T5 architectures (../shared/assets/README.md):
  gated-gelu, d_kv 64, vocabulary 32128, untied LM head. Their pretrained weights are the Hub ids
  in `HUB_IDS`.
- t5-mini: d_model 256, 4+4 layers (~22M parameters, 16.4M of them embedding + head).
- t5-micro: d_model 128, 3+3 layers (~10M parameters, 8.2M of them embedding + head): the shape
  that learns the demo's instructions fastest per CPU-minute (docs/results.md, "What moved
  quality": about twice the steps of t5-mini per minute, and better validation HR@1 after the
  same 4 minutes).
- t5-tiny: d_model 64, 2+2 layers; its 32128 x 64 embedding and head are 4.1M of its 4.3M
  parameters and one training step of 8 rows x 128 tokens takes ~30 ms. For tests.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

__all__ = ["SHAPES", "HUB_IDS", "shape_config", "RANDOM_PREFIX"]

# `--model random:<shape>`: a randomly initialised architecture (see engine/sources.py).
RANDOM_PREFIX = "random:"

# Fields every Flan-T5 checkpoint's config.json carries with these values.
_FLAN_T5 = dict(
    model_type="t5", d_kv=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    vocab_size=32128, relative_attention_num_buckets=32, relative_attention_max_distance=128,
    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.1,
    layer_norm_epsilon=1e-6, initializer_factor=1.0, is_encoder_decoder=True,
)

_SHAPES: dict[str, dict] = {
    "t5-tiny": dict(_FLAN_T5, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4),
    "t5-micro": dict(_FLAN_T5, d_model=128, d_ff=512, d_kv=32, num_layers=3, num_decoder_layers=3, num_heads=4),
    "t5-mini": dict(_FLAN_T5, d_model=256, d_ff=512, num_layers=4, num_decoder_layers=4, num_heads=4),
    "flan-t5-small": dict(_FLAN_T5, d_model=512, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6),
    "flan-t5-base": dict(_FLAN_T5, d_model=768, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12),
    "flan-t5-large": dict(_FLAN_T5, d_model=1024, d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16),
    "flan-t5-xl": dict(_FLAN_T5, d_model=2048, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32),
}
SHAPES: Mapping[str, Mapping] = MappingProxyType({k: MappingProxyType(v) for k, v in _SHAPES.items()})

# Shapes (and other bare names users type) with pretrained weights on the Hugging Face Hub.
HUB_IDS: Mapping[str, str] = MappingProxyType({
    "flan-t5-small": "google/flan-t5-small", "flan-t5-base": "google/flan-t5-base",
    "flan-t5-large": "google/flan-t5-large", "flan-t5-xl": "google/flan-t5-xl",
    "flan-t5-xxl": "google/flan-t5-xxl",
    "t5-small": "google-t5/t5-small", "t5-base": "google-t5/t5-base", "t5-large": "google-t5/t5-large",
    "t5-3b": "google-t5/t5-3b", "t5-11b": "google-t5/t5-11b",
})


def shape_config(name: str) -> dict:
    """A fresh, mutable copy of a shape's config.json dict; KeyError for an unknown name."""
    if name not in SHAPES:
        raise KeyError(f"unknown T5 shape {name!r}; known: {', '.join(SHAPES)}")
    return dict(SHAPES[name])
