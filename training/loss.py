"""The training objective computed only where it counts: the LM head and cross-entropy over the REAL
target tokens, in row chunks, never over [batch x target length x 32128] logits.

Hugging Face's T5ForConditionalGeneration applies its LM head to every decoder position, padding
included, and keeps the fp32 logits and their gradient for the whole batch. On the Video Games
instructions a batch of 16 rows has ~225 real target tokens padded to ~640 positions: two thirds of
the head's FLOPs (and of its 32128-wide softmax) are spent on padding. `T5SequenceLoss` runs the
encoder and decoder, gathers the hidden states of the real target tokens, and hands them to
`linear_cross_entropy`, which
- below `materialize_bytes` of logits computes them at once and lets autograd do the rest (the
  common case on a CPU: 225 x 32128 fp32 logits are 29 MB);
- above it runs a custom autograd function over row chunks that recomputes each chunk's logits in
  the backward pass, so peak memory is one chunk of logits whatever the batch (one extra
  [chunk x D] @ [D x V] GEMM per chunk: the memory-for-FLOPs trade of fused linear-CE kernels).

The loss is the SUM of token NLLs (with the token count), so gradient accumulation and data
parallelism can weight every target token equally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["linear_cross_entropy", "token_log_likelihoods", "T5SequenceLoss", "HiddenStatesHead", "IGNORE_INDEX"]

IGNORE_INDEX = -100
# Logits below this size are materialised whole (fastest: one GEMM forward, two backward).
DEFAULT_MATERIALIZE_BYTES = 256 << 20
DEFAULT_CHUNK_ROWS = 1024


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Log-softmax in fp32 even from bf16 logits (fp64 stays fp64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), in row chunks; logits recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int):
        # The logits' matmul runs in the autocast dtype when autocast is on, and backward (which
        # runs outside the autocast context) recomputes them in that same dtype.
        device = hidden.device.type
        ctx.compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):
            return _ChunkedLinearCrossEntropy._forward(ctx, hidden, weight, targets, chunk_rows)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, chunk_rows):
        w = weight.to(ctx.compute_dtype)
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        lse_parts = []
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows].to(ctx.compute_dtype)  # [c, D]
            logits = at_least_fp32(h @ w.t())  # [c, V]
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            t = targets[start:start + chunk_rows]
            picked = logits.gather(1, t.clamp_min(0)[:, None]).squeeze(1)
            total += torch.where(t != IGNORE_INDEX, lse - picked, 0.0).sum()
            lse_parts.append(lse)
        ctx.save_for_backward(hidden, weight, targets, torch.cat(lse_parts))
        ctx.chunk_rows = chunk_rows
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk_rows
        w = weight.to(ctx.compute_dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                                  device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk].to(ctx.compute_dtype)
            logits = at_least_fp32(h @ w.t())
            probs = torch.exp(logits - lse[start:start + chunk, None])  # softmax, [c, V]
            t = targets[start:start + chunk]
            probs[torch.arange(h.shape[0], device=h.device), t.clamp_min(0)] -= 1.0
            # dCE/dlogits [c, V]; an ignored row's scale is 0, so it adds no gradient
            g = (probs * (grad_total * (t != IGNORE_INDEX))[:, None]).to(ctx.compute_dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = (g @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += g.t() @ h
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         chunk_rows: int = DEFAULT_CHUNK_ROWS,
                         materialize_bytes: int = DEFAULT_MATERIALIZE_BYTES) -> torch.Tensor:
    """Summed cross-entropy of `targets` [N] under logits hidden [N, D] @ weight [V, D]^T, computed
    in fp32 (log-softmax over V), without holding [N, V] logits when they exceed materialize_bytes.
    Rows whose target is IGNORE_INDEX add nothing (shape padding: tune_model.sequence_nll_sum)."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0  # keeps the graph (and DDP's hooks) connected
    if hidden.shape[0] * weight.shape[0] * 4 <= materialize_bytes:
        logits = at_least_fp32(hidden @ weight.t())  # [N, V]
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)


def token_log_likelihoods(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """log p(target_i) [N] under logits hidden [N, D] @ weight [V, D]^T, log-softmax in fp32: the
    per-token values `linear_cross_entropy` sums, for scores that need them per sequence (the
    ranking term). Past chunk_rows rows, in chunks whose logits are recomputed in the backward pass
    (torch.utils.checkpoint), so at most one chunk's [chunk x V] logits live at a time."""
    from torch.utils.checkpoint import checkpoint

    def chunk(h, t):
        return torch.log_softmax(at_least_fp32(h @ weight.t()), dim=-1).gather(1, t[:, None]).squeeze(1)

    if hidden.shape[0] <= chunk_rows:
        return chunk(hidden, targets)
    return torch.cat([checkpoint(chunk, hidden[s:s + chunk_rows], targets[s:s + chunk_rows], use_reentrant=False)
                      for s in range(0, hidden.shape[0], chunk_rows)])


class T5SequenceLoss(nn.Module):
    """Wraps a Hugging Face T5ForConditionalGeneration (or a PEFT model around one) so that its
    forward returns (summed target-token NLL, number of target tokens): the module a data-parallel
    wrapper sees, so gradient synchronisation stays attached to the forward it runs."""

    def __init__(self, t5: nn.Module, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 materialize_bytes: int = DEFAULT_MATERIALIZE_BYTES):
        super().__init__()
        self.t5 = t5
        self.chunk_rows, self.materialize_bytes = chunk_rows, materialize_bytes

    def _base(self) -> nn.Module:
        return self.t5.get_base_model() if hasattr(self.t5, "get_base_model") else self.t5

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        base = self._base()
        # Teacher forcing: decoder input = labels shifted right behind decoder_start, -100 read as pad.
        decoder_input_ids = base._shift_right(labels)
        enc = base.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        dec = base.decoder(input_ids=decoder_input_ids, encoder_hidden_states=enc.last_hidden_state,
                           encoder_attention_mask=attention_mask, return_dict=True)
        keep = labels != IGNORE_INDEX  # [B, T]
        hidden = dec.last_hidden_state[keep]  # [N, D], real target tokens only
        if base.config.tie_word_embeddings:
            hidden = hidden * (base.config.d_model ** -0.5)  # as T5ForConditionalGeneration does
        nll = linear_cross_entropy(hidden, base.lm_head.weight, labels[keep],
                                   chunk_rows=self.chunk_rows, materialize_bytes=self.materialize_bytes)
        return nll, keep.sum()


class HiddenStatesHead(nn.Module):
    """Stands in for a Hugging Face T5's `lm_head` during training: it holds the head's weight (the
    same Parameter, under the same state-dict name `lm_head.weight`, tied or not) but returns the
    decoder states unchanged, so the model's forward, and with it a DDP wrapper's gradient hooks,
    stays the one the trainer calls while the loss computes logits for real target tokens only
    (`linear_cross_entropy`). Checkpoints are unchanged: only the forward differs."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden
