"""Named T5 architecture presets, initialised at random by `instructrec train --model NAME`.

The four flan-t5-* shapes are the published Flan-T5 architectures (../shared/assets/README.md):
all gated-gelu, d_kv 64, vocabulary 32128, untied LM head. No pretrained weights exist on these
machines, so a preset is a fair stand-in for speed and memory, never for quality.

The two small shapes exist so that a run finishes in minutes on 2 CPU cores:
- t5-tiny: d_model 64, 2+2 layers. Its 32128 x 64 embedding and head (4.1M of its 4.3M
  parameters) dominate; one step of 8 rows x 128 tokens takes ~30 ms here. For tests.
- t5-mini: d_model 256, 4+4 layers (~22M parameters, 16.4M of them embedding + head); the
  smallest shape that learns the real Video Games instructions in a ~10 minute CPU run.
"""

from __future__ import annotations

from instructrec.engine.errors import InputError

# Fields shared by every Flan-T5 checkpoint's config.json.
_COMMON = dict(
    d_kv=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False, vocab_size=32128,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.1,
    layer_norm_epsilon=1e-6, initializer_factor=1.0,
)

PRESETS: dict[str, dict] = {
    "t5-tiny": dict(_COMMON, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2,
                    num_heads=4),
    "t5-mini": dict(_COMMON, d_model=256, d_ff=512, num_layers=4, num_decoder_layers=4,
                    num_heads=4),
    "flan-t5-small": dict(_COMMON, d_model=512, d_ff=1024, num_layers=8, num_decoder_layers=8,
                          num_heads=6),
    "flan-t5-base": dict(_COMMON, d_model=768, d_ff=2048, num_layers=12, num_decoder_layers=12,
                         num_heads=12),
    "flan-t5-large": dict(_COMMON, d_model=1024, d_ff=2816, num_layers=24, num_decoder_layers=24,
                          num_heads=16),
    "flan-t5-xl": dict(_COMMON, d_model=2048, d_ff=5120, num_layers=24, num_decoder_layers=24,
                       num_heads=32),
}


def preset_config(name: str):
    """The `T5Config` of a preset; `InputError` naming the known presets for an unknown name."""
    from transformers import T5Config

    if name not in PRESETS:
        raise InputError(
            "model", f"{name!r} is neither a checkpoint directory nor a known preset",
            f"pass a directory holding config.json, or one of: {', '.join(PRESETS)}")
    return T5Config(**PRESETS[name])
