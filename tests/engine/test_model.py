"""The compact T5 (engine/model.py) against Hugging Face's own forward, layer by layer, on random
weights of small shapes: embeddings, every encoder block, the encoder output, every decoder
block, and the logits; gated-gelu with an untied head and relu with a tied (rescaled) head."""

from __future__ import annotations

import pytest
import torch
from transformers import T5Config as HFConfig
from transformers import T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

from instructrec.engine.model import T5Config, build_model, relative_position_bucket
from instructrec.engine.presets import SHAPES, shape_config

# The one table of shapes (engine/presets.py), as the engine's configs.
PRESETS = {name: T5Config.from_hf(shape_config(name)) for name in SHAPES}


# Model tests run on one torch thread (see the one_torch_thread fixture in conftest).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


SHAPES = {
    "gated-gelu-untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "relu-tied": dict(feed_forward_proj="relu", tie_word_embeddings=True),
}


def _pair(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    hc = HFConfig(d_model=64, d_ff=96, d_kv=16, num_layers=3, num_decoder_layers=2, num_heads=4,
                  vocab_size=300, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                  relative_attention_num_buckets=32, relative_attention_max_distance=20, **SHAPES[kind])
    hf = T5ForConditionalGeneration(hc).eval()
    ours = build_model(T5Config.from_hf(hc), hf.state_dict(), torch.float32, torch.device("cpu"))
    return hf, ours


def _capture(blocks) -> tuple[list, list]:
    out, handles = [], []
    for block in blocks:
        handles.append(block.register_forward_hook(lambda m, i, o: out.append(o[0].detach())))
    return out, handles


@pytest.mark.parametrize("kind", list(SHAPES))
def test_layer_by_layer_matches_hugging_face(kind):
    hf, ours = _pair(kind)
    g = torch.Generator().manual_seed(1)
    # Sources longer than max_distance (20) so the logarithmic buckets are exercised; row 1 padded.
    src = torch.randint(2, 300, (2, 41), generator=g)
    mask = torch.ones(2, 41, dtype=torch.bool)
    mask[1, 30:] = False
    src[1, 30:] = 0
    dec = torch.randint(2, 300, (2, 27), generator=g)
    dec[:, 0] = 0
    enc_blocks, h1 = _capture(hf.encoder.block)
    dec_blocks, h2 = _capture(hf.decoder.block)
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec, output_hidden_states=True)
        for h in h1 + h2:
            h.remove()
        ours_enc_blocks, ours_dec_blocks = [], []
        enc = ours.encode(src, mask, collect=ours_enc_blocks)
        # One candidate per row: [B=2, R=1, T=27], all tokens in segment 0.
        hidden = ours.decode(dec[:, None], torch.zeros_like(dec)[:, None], ours.encoder_kv(enc), mask,
                             collect=ours_dec_blocks)
        logits = hidden[:, 0] @ ours.lm_weight.T

    tol = dict(atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ours.shared(src), ref.encoder_hidden_states[0], **tol)
    assert len(ours_enc_blocks) == len(enc_blocks) == 3
    for a, b in zip(ours_enc_blocks, enc_blocks):
        torch.testing.assert_close(a[mask], b[mask], **tol)
    torch.testing.assert_close(enc[mask], ref.encoder_last_hidden_state[mask], **tol)
    assert len(ours_dec_blocks) == len(dec_blocks) == 2
    for a, b in zip(ours_dec_blocks, dec_blocks):
        torch.testing.assert_close(a[:, 0], b, **tol)
    torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=1e-5)


def test_relative_position_bucket_matches_hugging_face():
    rel = torch.arange(-300, 301)[None, :]
    for bidirectional in (True, False):
        ours = relative_position_bucket(rel, bidirectional, 32, 128)
        ref = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32,
                                                    max_distance=128)
        assert torch.equal(ours, ref)


def test_bf16_model_tracks_fp32():
    hf, ours32 = _pair("gated-gelu-untied", seed=3)
    ours16 = build_model(ours32.cfg, hf.state_dict(), torch.bfloat16, torch.device("cpu"))
    src = torch.randint(2, 300, (1, 30))
    mask = torch.ones_like(src, dtype=torch.bool)
    with torch.no_grad():
        a = ours32.encode(src, mask)
        b = ours16.encode(src, mask).float()
    # bf16 keeps 8 mantissa bits (relative step 2**-8 = 0.4%); 3 layers of rounding stay within 5%.
    assert (a - b).norm() / a.norm() < 0.05


def test_presets_match_the_documented_shapes():
    assert PRESETS["flan-t5-small"].d_model == 512 and PRESETS["flan-t5-small"].num_heads == 6
    base, large, xl = PRESETS["flan-t5-base"], PRESETS["flan-t5-large"], PRESETS["flan-t5-xl"]
    assert (base.d_model, base.d_ff, base.num_layers, base.num_heads) == (768, 2048, 12, 12)
    assert (large.d_model, large.d_ff, large.num_layers, large.num_heads) == (1024, 2816, 24, 16)
    assert (xl.d_model, xl.d_ff, xl.num_layers, xl.num_heads) == (2048, 5120, 24, 32)
    with torch.device("meta"):
        from instructrec.engine.model import T5
        n = sum(p.numel() for p in T5(PRESETS["flan-t5-small"]).parameters())
    assert 76e6 < n < 78e6  # flan-t5-small has 77M parameters


def test_missing_weight_is_named():
    hf, _ = _pair("gated-gelu-untied")
    sd = dict(hf.state_dict())
    del sd["decoder.block.1.layer.1.EncDecAttention.k.weight"]
    with pytest.raises(KeyError, match=r"decoder\.block\.1\.layer\.1\.EncDecAttention\.k\.weight"):
        build_model(T5Config.from_hf(hf.config), sd, torch.float32, torch.device("cpu"))
