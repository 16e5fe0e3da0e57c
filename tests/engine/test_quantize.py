"""Dynamic int8 quantisation of the engine's T5 (engine/quantize.py) against Hugging Face's own
fp32 forward: every linear layer quantised, the LM head and embedding untouched, candidate scores
within a bounded error of the fp32 reference, top-1 agreement and Kendall tau measured (random
weights, so the figures are a floor for the method, not a claim about a trained checkpoint)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers import T5ForConditionalGeneration

from instructrec.engine.capabilities import cpu_info
from instructrec.engine.errors import InputError
from instructrec.engine.model import T5Config, build_model
from instructrec.engine.quantize import quantize_dynamic_int8, quantized_linear_count

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CANDIDATES = 10


def _engine_model(hf) -> nn.Module:
    return build_model(T5Config.from_hf(hf.config), hf.state_dict(), torch.float32, torch.device("cpu"))


def _requests(n: int, source_len: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [([int(t) for t in rng.integers(2, vocab, source_len)] + [1],
             [[int(t) for t in rng.integers(2, vocab, int(rng.integers(3, 12)))] + [1] for _ in range(CANDIDATES)])
            for _ in range(n)]


def _engine_scores(model, source: list[int], targets: list[list[int]]) -> np.ndarray:
    """Sum of log P(target | source) per target through the engine's encode / encoder_kv / decode,
    one candidate per decoder row (segment 0; padding gets segment 1), fp32 log-softmax head."""
    n, width = len(targets), max(len(t) for t in targets)
    ids = torch.zeros(1, n, width, dtype=torch.long)  # row: [start, y_1 .. y_{k-1}], start id 0
    segments = torch.ones(1, n, width, dtype=torch.long)
    labels = torch.full((n, width), -1)
    for i, t in enumerate(targets):
        ids[0, i, 1:len(t)] = torch.tensor(t[:-1])
        segments[0, i, :len(t)] = 0
        labels[i, :len(t)] = torch.tensor(t)
    src = torch.tensor([source])
    mask = torch.ones_like(src, dtype=torch.bool)
    with torch.inference_mode():
        hidden = model.decode(ids, segments, model.encoder_kv(model.encode(src, mask)), mask)[0]  # [n, T, D]
        logp = torch.log_softmax(hidden.float() @ model.lm_weight.float().T, -1)
        picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (picked.double() * (labels >= 0)).sum(-1).numpy()


def _hf_scores(hf, source: list[int], targets: list[list[int]]) -> np.ndarray:
    """The reference: Hugging Face's fp32 forward with the targets as labels (padding -100)."""
    width = max(len(t) for t in targets)
    labels = torch.full((len(targets), width), -100)
    for i, t in enumerate(targets):
        labels[i, :len(t)] = torch.tensor(t)
    src = torch.tensor([source] * len(targets))
    with torch.inference_mode():
        logits = hf(input_ids=src, labels=labels).logits
        logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (logp.double() * (labels != -100)).sum(-1).numpy()


def _kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    i, j = np.triu_indices(len(a), k=1)
    return float(np.sum(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j])) / len(i))  # no ties in float scores


def test_every_linear_is_quantised_and_the_head_stays_fp32(tiny_t5_dir):
    hf = T5ForConditionalGeneration.from_pretrained(tiny_t5_dir).eval()
    model = _engine_model(hf)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    head, embedding = model.lm_weight.clone(), model.shared.weight.clone()
    assert quantize_dynamic_int8(model) is model  # in place
    # encoder layer: qkv, o, wi, wo; decoder layer: those and cross q, kv, o
    assert linears == 4 * model.cfg.num_layers + 7 * model.cfg.num_decoder_layers
    assert quantized_linear_count(model) == linears
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert model.lm_weight.dtype == torch.float32 and torch.equal(model.lm_weight, head)
    assert torch.equal(model.shared.weight, embedding) and model.residual_dtype == torch.float32


# Measured (one thread): max |score error| / mean |score| 0.8% on t5-tiny and 2.3% on
# flan-t5-small (random weights, 8-bit activations, a VNNI CPU); top-1 agreement 1.0 on both.
# On an AVX2-only CPU (7-bit activations) flan-t5-small agreed on 11 of 12 first choices.
@pytest.mark.parametrize("model_dir, source_len, requests, max_relative_error", [
    ("tiny_t5_dir", 60, 12, 0.03),
    ("small_t5_dir", 60, 12, 0.05),
], ids=["t5-tiny", "flan-t5-small"])
def test_int8_scores_against_hugging_face_fp32(request, model_dir, source_len, requests, max_relative_error):
    hf = T5ForConditionalGeneration.from_pretrained(request.getfixturevalue(model_dir)).eval()
    fp32 = _engine_model(hf)
    int8 = quantize_dynamic_int8(_engine_model(hf))
    errors, magnitudes, top1, taus = [], [], [], []
    for source, targets in _requests(requests, source_len, hf.config.vocab_size):
        reference = _hf_scores(hf, source, targets)
        # the scoring helper is exact on the fp32 engine, so the difference below is int8's alone
        np.testing.assert_allclose(_engine_scores(fp32, source, targets), reference, rtol=1e-4, atol=1e-2)
        scores = _engine_scores(int8, source, targets)
        errors.append(np.max(np.abs(scores - reference)))
        magnitudes.append(np.mean(np.abs(reference)))
        top1.append(np.argmax(scores) == np.argmax(reference))
        taus.append(_kendall_tau(scores, reference))
    relative = max(errors) / np.mean(magnitudes)
    request.node.user_properties += [("max_relative_score_error", relative), ("top1_agreement", np.mean(top1)),
                                     ("kendall_tau", np.mean(taus))]
    assert relative < max_relative_error
    # Random candidates include near ties that int8 may swap: the 7-bit path of an AVX2-only CPU
    # swapped a 4.0-nat margin (a 27-nat error, inside the 5% bound) in 1 of 12 flan-t5-small
    # requests, the 8-bit path another: a rate over 12 requests, not 4, so one swap is not a failure.
    assert np.mean(top1) >= 0.8
    assert np.mean(taus) >= 0.9


@pytest.mark.skipif(not cpu_info().native_int8, reason="no VNNI: the full-range (8-bit) path is not used here")
def test_full_range_activations_do_not_saturate():
    """All activations and weights at their largest codes (255 x 127): summed in int16 pairs
    without VNNI they would saturate at 32767, about half the true sum; what remains must be the
    rounding of the activation scale (1/255 measured)."""
    linear = nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        linear.weight.fill_(0.5)  # per-channel scale 0.5 / 127: the code 127 exactly
    model = quantize_dynamic_int8(nn.Sequential(linear), full_range=True)
    x = torch.ones(32, 256)  # per-tensor range [0, 1]: the code 255 exactly
    torch.testing.assert_close(model(x), torch.full((32, 64), 128.0), rtol=1e-2, atol=0.0)


def test_seven_bit_path_also_bounded(tiny_t5_dir):
    hf = T5ForConditionalGeneration.from_pretrained(tiny_t5_dir).eval()
    int8 = quantize_dynamic_int8(_engine_model(hf), full_range=False)
    (source, targets), = _requests(1, 60, hf.config.vocab_size, seed=3)
    reference = _hf_scores(hf, source, targets)
    assert np.max(np.abs(_engine_scores(int8, source, targets) - reference)) < 0.05 * np.mean(np.abs(reference))


def test_refuses_what_it_cannot_quantise(tiny_t5_dir):
    hf = T5ForConditionalGeneration.from_pretrained(tiny_t5_dir).eval()
    bf16 = build_model(T5Config.from_hf(hf.config), hf.state_dict(), torch.bfloat16, torch.device("cpu"))
    with pytest.raises(InputError) as e:
        quantize_dynamic_int8(bf16)
    assert e.value.field == "dtype" and "fp32" in str(e.value)


def test_reranker_int8_against_hugging_face_fp32(tiny_t5_dir, hf_log_likelihoods):
    """dtype="int8" through the public API: every linear quantised, scores near Hugging Face's own
    fp32 forward of the same checkpoint (the bound test_quantize measures per layer: a few %)."""
    from instructrec.engine import Reranker

    reranker = Reranker.from_pretrained(tiny_t5_dir, dtype="int8")
    assert reranker.backend.precision == "int8"
    assert quantized_linear_count(reranker.backend.model) > 0
    instruction = "Recommend the next game for a fan of racing games."
    titles = ["Turbo Kart Racer", "Puzzle Island", "Galaxy Command", "Soccer Stars"]
    got = reranker.score(instruction, titles)
    want = hf_log_likelihoods(tiny_t5_dir, instruction, titles)
    assert np.all(np.abs(got - want) <= 0.05 * np.abs(want) + 0.05), (got, want)
    fp32 = Reranker.from_pretrained(tiny_t5_dir, dtype="float32")
    assert fp32.backend.precision == "float32"


def test_int8_is_refused_where_it_cannot_run(tiny_t5_dir):
    from instructrec.engine import Reranker

    with pytest.raises(InputError, match="compile_model"):
        Reranker.from_pretrained(tiny_t5_dir, dtype="int8", compile_model=True)
    from instructrec.engine.loading import weights_precision

    with pytest.raises(InputError, match="int8 runs on the CPU"):
        weights_precision("int8", torch.device("cuda"))
    assert weights_precision("int8", torch.device("cpu")) == (torch.float32, True)
