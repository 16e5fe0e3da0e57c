"""training/loss.py against plain references: Hugging Face's own T5 loss, and autograd through a
fully materialised log-softmax."""

from __future__ import annotations

import pytest
import torch

from instructrec.engine.presets import shape_config
from instructrec.training.loss import T5SequenceLoss, linear_cross_entropy


@pytest.mark.parametrize("materialize_bytes", [1 << 40, 0])  # whole logits / chunked recompute
def test_linear_cross_entropy_matches_plain_autograd(materialize_bytes):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 24, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(101, 24, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 101, (37,), generator=gen)
    got = linear_cross_entropy(hidden, weight, targets, chunk_rows=8, materialize_bytes=materialize_bytes)
    got.backward()
    g_hidden, g_weight = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = -torch.log_softmax(hidden @ weight.t(), -1).gather(1, targets[:, None]).sum()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_hidden, hidden.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g_weight, weight.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("tied", [False, True])
def test_t5_sequence_loss_equals_hugging_face_loss_and_gradients(tied):
    from transformers import T5Config, T5ForConditionalGeneration

    config = shape_config("t5-tiny")
    config.pop("model_type")
    config.update(vocab_size=300, tie_word_embeddings=tied, dropout_rate=0.0)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(**config)).double()
    ids = torch.randint(2, 300, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = torch.randint(2, 300, (3, 6))
    labels[0, 4:] = -100
    labels[2, 2:] = -100
    nll, count = T5SequenceLoss(model, chunk_rows=4, materialize_bytes=0)(ids, mask, labels)
    nll.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    hf = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # mean over real tokens
    (hf * 12).backward()
    assert int(count) == int((labels != -100).sum()) == 12
    torch.testing.assert_close(nll.double(), hf * 12, rtol=1e-10, atol=1e-10)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours[name], p.grad, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("tied", [False, True])
def test_trainer_head_on_real_tokens_equals_the_full_head(tied):
    """tune_model.sequence_nll_sum with the hidden-states head (real target tokens only) against the
    same model's full-vocabulary head over every position: same loss, same gradients, same
    state-dict names."""
    import copy

    from transformers import T5Config, T5ForConditionalGeneration

    from instructrec.training.tune_model import install_hidden_states_head, sequence_nll_sum

    config = shape_config("t5-tiny")
    config.pop("model_type")
    config.update(vocab_size=300, tie_word_embeddings=tied, dropout_rate=0.0)
    torch.manual_seed(1)
    full = T5ForConditionalGeneration(T5Config(**config))  # fp32, as the trainer runs it
    fast = copy.deepcopy(full)
    names = list(fast.state_dict())
    head = install_hidden_states_head(fast)
    assert list(fast.state_dict()) == names
    ids = torch.randint(2, 300, (4, 9))
    mask = torch.ones_like(ids)
    labels = torch.randint(2, 300, (4, 5))
    labels[1, 3:] = -100
    decoder_ids = full._shift_right(labels)
    want = sequence_nll_sum(full, ids, mask, decoder_ids, labels)
    got = sequence_nll_sum(fast, ids, mask, decoder_ids, labels, head=head)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    grads = dict(full.named_parameters())
    for name, p in fast.named_parameters():  # fp32 sums in another order: ~1e-7 relative apart
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
