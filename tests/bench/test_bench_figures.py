"""FLOP counts against torch's own FlopCounterMode, Kendall tau against hand-computed cases (and
scipy when installed), and the typed errors of unknown names."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from instructrec.bench.agreement import kendall_tau, ranking_agreement, ranking_to_scores
from instructrec.bench.flops import T5Shape, encoding_flops, model_flops, padded_batch_flops, per_pair_flops
from instructrec.bench.harness import BenchConfig, resolve_providers, run_bench
from instructrec.bench.workloads import Encoding, check_names
from instructrec.engine.errors import InputError

# Odd sizes so that no two terms can stand in for each other: 3 decoder layers vs 2 encoder layers.
HAND = dict(d_model=48, d_ff=80, d_kv=8, num_layers=2, num_decoder_layers=3, num_heads=3,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False, vocab_size=97)


def _hf_model(config: dict):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                               **config)).eval()


def _counted(model, rows: int, source_len: int, target_len: int) -> int:
    ids = torch.randint(2, 90, (rows, source_len))
    dec = torch.randint(2, 90, (rows, target_len))
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(input_ids=ids, decoder_input_ids=dec)
    return counter.get_total_flops()


@pytest.mark.parametrize("feed_forward", ["gated-gelu", "relu"])
def test_executed_flops_match_torch_flop_counter(one_torch_thread, feed_forward):
    config = dict(HAND, feed_forward_proj=feed_forward)
    shape = T5Shape.from_config(config)
    model = _hf_model(config)
    rows, s, n = 3, 11, 5
    assert per_pair_flops(shape, [(s, n)] * rows).total == _counted(model, rows, s, n)
    # a padded batch runs every row at the longest lengths
    assert padded_batch_flops(shape, [[(s, n), (s - 4, n - 2), (s - 1, n)]]).total == _counted(model, rows, s, n)


def test_model_flops_hand_case():
    """One encoding of S=4 source tokens, one target of n=2, on a 1-layer model small enough to
    count by hand: D=2, d_ff=3 (not gated), 1 head of d_kv=2, vocab 5."""
    shape = T5Shape(d_model=2, d_ff=3, heads=1, d_kv=2, encoder_layers=1, decoder_layers=1, vocab=5, gated=False)
    count = encoding_flops(shape, 4, [2])
    # encoder: 4 tokens x (q,k,v,o: 4 x 2*2*2 = 32, FFN: 2 x 2*2*3 = 24) + scores and mixing 2 x 2*4*4*2 = 128
    assert count.encoder == 4 * (32 + 24) + 128
    # cross K and V over the 4 source tokens: 2 x 2*4*2*2
    assert count.cross_kv == 64
    # decoder: 2 tokens x (self q,k,v,o 32 + cross q,o 16 + FFN 24) + causal self pairs (1 + 2 = 3)
    # x 2 x 2*2 + cross pairs 2*4 x 2 x 2*2
    assert count.decoder == 2 * (32 + 16 + 24) + 3 * 8 + 8 * 8
    assert count.head == 2 * 2 * 5 * 2
    dense = encoding_flops(shape, 4, [2], causal=False)
    assert dense.decoder - count.decoder == (4 - 3) * 8  # n*n = 4 pairs instead of 3
    # the work needed: each encoding once, however many candidates share it
    work = [Encoding(source=[5] * 4, targets=[[1, 2], [3, 4]])]
    assert model_flops(shape, work).encoder == count.encoder
    assert model_flops(shape, work).decoder == 2 * count.decoder


def test_kendall_tau_hand_cases():
    assert kendall_tau([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # one swapped neighbour pair out of 6 pairs: (5 - 1) / 6
    assert kendall_tau([1, 2, 3, 4], [2, 1, 3, 4]) == pytest.approx(4 / 6)
    # tau-b with a tie in y: pairs (a<b<c): x concordant/discordant signs +,+,+ ; y signs 0,+,+
    # -> (0 + 1 + 1) / sqrt(3 * 2)
    assert kendall_tau([1, 2, 3], [1, 1, 2]) == pytest.approx(2 / math.sqrt(6))
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="scipy is not installed")
def test_kendall_tau_matches_scipy():
    from scipy.stats import kendalltau

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randint(0, 5, (12,), generator=g).tolist()
        y = torch.randint(0, 5, (12,), generator=g).tolist()
        assert kendall_tau(x, y) == pytest.approx(kendalltau(x, y).statistic, nan_ok=True)


def test_ranking_agreement_on_shared_prefix():
    reference = [[0, 1, 2], [2, 1, 0], [1, 0, 2]]
    provider = [[0, 2, 1], [1, 2, 0]]  # ranked only the first two requests
    assert list(ranking_to_scores([2, 0, 1])) == [-1.0, -2.0, 0.0]
    result = ranking_agreement(provider, reference)
    assert result["requests"] == 2
    assert result["top1_agreement"] == 0.5
    assert result["kendall_tau"] == pytest.approx((1 / 3 + 1 / 3) / 2)


def test_unknown_names_are_typed_errors(tmp_path):
    with pytest.raises(InputError) as e:
        check_names("--workloads", ["rerank-10", "rerank-1000"], ("rerank-10", "rerank-100"))
    assert e.value.field == "--workloads" and "rerank-1000" in str(e.value) and "rerank-100" in str(e.value)
    with pytest.raises(InputError, match="--providers: unknown name 'vllm'"):
        resolve_providers(["engine-torch-fp32", "vllm"])
    with pytest.raises(InputError, match="--models: unknown random shape 'flan-t5-xxxl'"):
        run_bench(BenchConfig(workloads=["rerank-10"], providers=["engine-torch-fp32"], models=["random:flan-t5-xxxl"],
                              out=tmp_path, cache=tmp_path))
    # a bare shape name is refused, naming both meanings (engine/sources.py), before any work
    with pytest.raises(InputError) as e:
        run_bench(BenchConfig(workloads=["rerank-10"], providers=["engine-torch-fp32"], models=["flan-t5-base"],
                              out=tmp_path / "out", cache=tmp_path / "cache"))
    assert e.value.field == "--models" and "google/flan-t5-base" in str(e.value) and "random:flan-t5-base" in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    with pytest.raises(InputError, match="--workloads: unknown name 'listwise'"):
        run_bench(BenchConfig(workloads=["listwise"], providers=["engine-torch-fp32"], models=["random:flan-t5-small"],
                              out=tmp_path, cache=tmp_path))
