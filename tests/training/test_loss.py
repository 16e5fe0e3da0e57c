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


@pytest.mark.parametrize("materialize_bytes", [1 << 40, 0])  # whole logits / chunked recompute
def test_rows_with_the_ignore_index_add_nothing_to_loss_or_gradients(materialize_bytes):
    from instructrec.training.loss import IGNORE_INDEX

    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(29, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(61, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 61, (29,), generator=gen)
    ignored = torch.zeros(29, dtype=torch.bool)
    ignored[[0, 7, 8, 20, 28]] = True
    targets[ignored] = IGNORE_INDEX
    got = linear_cross_entropy(hidden, weight, targets, chunk_rows=8, materialize_bytes=materialize_bytes)
    got.backward()
    g_hidden, g_weight = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    kept = ~ignored
    want = -torch.log_softmax(hidden[kept] @ weight.t(), -1).gather(1, targets[kept][:, None]).sum()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_hidden, hidden.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g_weight, weight.grad, rtol=1e-9, atol=1e-9)
    assert torch.all(g_hidden[ignored] == 0)


def test_shape_padded_batches_give_hugging_faces_loss_and_gradients(tokenizer_dir):
    """collate's lengths rounded up to 16 and the head's rows to 64 (what the trainer does in bf16
    on a CPU) against Hugging Face's own loss on the exact-length batch, labels passed to its
    forward: the padding is masked and ignored, so loss and gradients are unchanged."""
    import copy

    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from instructrec.training.tune_data import collate, head_rows_multiple, tokenize_rows
    from instructrec.training.tune_model import install_hidden_states_head, sequence_nll_sum

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    sources = ["Bought: Rally Kart 2 - PC; Moon Garden. Next?", "Bought: Pocket Chess. Next?",
               "Bought: Tiny Farm; Star Drift - Switch; Rally Kart 2 - PC. Next?"]
    targets = ["Moon Garden Deluxe Edition", "Star Drift", "Rally Kart 3 - PC"]
    rows = tokenize_rows(tokenizer, sources, targets, 512, 64, "train")
    config = shape_config("t5-tiny")
    config.pop("model_type")
    config["dropout_rate"] = 0.0
    torch.manual_seed(2)
    reference = T5ForConditionalGeneration(T5Config(**config))
    model = copy.deepcopy(reference)
    head = install_hidden_states_head(model)
    ids, mask, _, labels = collate(rows, [0, 1, 2], tokenizer.pad_token_id, 0, "cpu")
    want = reference(input_ids=ids, attention_mask=mask, labels=labels).loss * (labels != -100).sum()
    padded = collate(rows, [0, 1, 2], tokenizer.pad_token_id, 0, "cpu", 16)
    assert padded[0].shape[1] == -(-ids.shape[1] // 16) * 16 > ids.shape[1]
    assert padded[3].shape[1] == 16 > labels.shape[1]
    got = sequence_nll_sum(model, *padded, head=head, head_rows_multiple=head_rows_multiple(16))
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        # fp32 sums in another order (padded shapes pick other kernel blockings: on a Zen 4 CPU the
        # decoder's q.weight gradient differed by 3.1e-5 in elements near zero, its largest being
        # 45): the absolute tolerance scales with the tensor's largest gradient.
        scale = float(grads[name].grad.abs().max())
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=max(1e-5, 2e-6 * scale), msg=name)


def _losses_and_gradients(models, seed: int) -> list[tuple[torch.Tensor, dict]]:
    """Each model's Hugging Face loss (labels passed to its forward) and parameter gradients on one
    seeded batch of padded sources and ignored label positions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 300, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    labels = torch.randint(2, 300, (3, 5), generator=gen)
    labels[1, 3:] = -100
    out = []
    for model in models:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        out.append((loss, {name: p.grad for name, p in model.named_parameters()}))
    return out


def test_fused_activations_give_hugging_faces_loss_and_gradients():
    """tune_model.install_fused_activations swaps Hugging Face's gelu_new expression for torch's fused
    tanh-GELU: every feed-forward swapped, the same state dict and config, and Hugging Face's own
    loss and gradients of the unswapped model (float64, so only the formula could differ)."""
    import copy

    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.activations import NewGELUActivation

    from instructrec.training.tune_model import install_fused_activations

    config = shape_config("t5-tiny")  # gated-gelu, as Flan-T5
    config.pop("model_type")
    config.update(vocab_size=300, dropout_rate=0.0)
    torch.manual_seed(2)
    reference = T5ForConditionalGeneration(T5Config(**config)).double()
    fused = copy.deepcopy(reference)
    before = fused.config.to_dict()
    layers = config["num_layers"] + config["num_decoder_layers"]
    assert install_fused_activations(fused) == layers
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    assert sum(isinstance(m, torch.nn.GELU) and m.approximate == "tanh" for m in fused.modules()) == layers
    assert list(fused.state_dict()) == list(reference.state_dict()) and fused.config.to_dict() == before
    (want, want_grads), (got, got_grads) = _losses_and_gradients((reference, fused), seed=2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_fused_activations_leave_a_relu_t5_alone():
    from transformers import T5Config, T5ForConditionalGeneration

    from instructrec.training.tune_model import install_fused_activations

    config = shape_config("t5-tiny")
    config.pop("model_type")
    config.update(vocab_size=300, feed_forward_proj="relu")
    model = T5ForConditionalGeneration(T5Config(**config))
    assert install_fused_activations(model) == 0
    assert sum(isinstance(m, torch.nn.ReLU) for m in model.modules()) == 4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_norms_give_hugging_faces_loss_and_gradients(dtype):
    """tune_model.install_fused_norms: every T5LayerNorm swapped for the hand-written backward, the
    same Parameters under the same names, and Hugging Face's loss and gradients of the unswapped
    model (norm weights drawn away from 1 so that their gradients matter)."""
    import copy

    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    from instructrec.training.tune_model import install_fused_norms

    config = shape_config("t5-tiny")
    config.pop("model_type")
    config.update(vocab_size=300, dropout_rate=0.0)
    torch.manual_seed(3)
    reference = T5ForConditionalGeneration(T5Config(**config)).to(dtype)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, T5LayerNorm):
                module.weight.uniform_(0.5, 1.5)
    fused = copy.deepcopy(reference)
    # 2 per encoder layer, 3 per decoder layer, and each stack's final norm.
    assert install_fused_norms(fused) == 2 * config["num_layers"] + 3 * config["num_decoder_layers"] + 2
    assert not any(type(m) is T5LayerNorm for m in fused.modules())
    assert list(fused.state_dict()) == list(reference.state_dict())
    (want, want_grads), (got, got_grads) = _losses_and_gradients((reference, fused), seed=3)
    # Both take the variance in fp32 (Hugging Face's rule), so float64 agrees to fp32's rounding.
    tol = 1e-6 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for name, grad in got_grads.items():
        reference_grad = want_grads[name]
        torch.testing.assert_close(grad, reference_grad, rtol=tol, atol=tol * float(reference_grad.abs().max()),
                                   msg=name)


def test_fused_norms_keep_the_bf16_autocast_loss():
    """Under the trainer's bf16 autocast (fp32 weights), the swapped norms give the loss of Hugging
    Face's norms: the forward computes the same fp32 expression."""
    import copy

    from transformers import T5Config, T5ForConditionalGeneration

    from instructrec.training.tune_model import install_fused_norms

    config = shape_config("t5-tiny")
    config.pop("model_type")
    config.update(vocab_size=300, dropout_rate=0.0)
    torch.manual_seed(4)
    reference = T5ForConditionalGeneration(T5Config(**config))
    fused = copy.deepcopy(reference)
    install_fused_norms(fused)
    ids = torch.randint(2, 300, (2, 12))
    labels = torch.randint(2, 300, (2, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference(input_ids=ids, labels=labels).loss
        got = fused(input_ids=ids, labels=labels).loss
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
