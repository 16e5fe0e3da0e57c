"""engine/flops.py against a count done by hand on a toy shape."""

from __future__ import annotations

from instructrec.engine.flops import T5Shape, encoding_flops, training_flops

# d_model 2, one head of d_kv 2, gated FFN of width 3, one layer each side, vocabulary 5.
TOY = T5Shape(d_model=2, d_ff=3, heads=1, d_kv=2, encoder_layers=1, decoder_layers=1, vocab=5, gated=True)


def test_one_encoding_counted_by_hand():
    # Source 3 tokens, one target of 2 tokens. Per token: q, k, v, o projections 4 x 2*2*2 = 32;
    # gated FFN 2*2*3*3 = 36. Encoder: 3 x 68 + scores and mixing 2 x 2*3*3*2 = 276.
    # Cross K/V: 2 x 2*3*2*2 = 48. Decoder: 2 tokens x (32 + cross q, o 16 + 36) + causal self
    # attention over 3 (query, key) pairs 2*2*3*2 = 24 + cross attention 2*2*2*3*2 = 48 -> 240.
    # Head: 2*2*5 per token x 2 = 40.
    count = encoding_flops(TOY, 3, [2])
    assert (count.encoder, count.cross_kv, count.decoder, count.head) == (276, 48, 240, 40)


def test_training_step_is_three_forwards_summed_over_rows():
    assert training_flops(TOY, [3, 3], [2, 2]) == 3 * 2 * 604


def test_ranking_negatives_add_their_decoding_and_head_only():
    # Row: source 3, own target 2 (604 as above), negatives of 2 and 1 tokens over the same encoding.
    # Negative of 2: decoder 240 + head 40 = 280. Negative of 1: 1 x (32 + 16 + 36) + causal self
    # attention over 1 pair 2*2*1*2 = 8 + cross attention 2*2*1*3*2 = 24 -> 116, head 2*2*5 = 20.
    assert training_flops(TOY, [3], [2], [[2, 1]]) == 3 * (604 + 280 + 136)
    assert training_flops(TOY, [3, 3], [2, 2], [[], []]) == training_flops(TOY, [3, 3], [2, 2])
