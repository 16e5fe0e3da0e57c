"""The one piece of the engine that touches the device: units in, `unit.scores` out.

Per read window the units are packed into decoder rows and planned into batches (engine/packing.py);
each batch is one encoder pass and one cross-attention K/V computation for its instructions, then
decoder passes over the packed candidate rows, whose hidden states go through the chunked LM head
(log-softmax-gather, so [tokens x vocab] never exists). Scores accumulate on the device and come
to the host once per window.
"""

from __future__ import annotations

import numpy as np
import torch

from .backend import Backend
from .packing import IGNORE, Unit, decoder_arrays, pack_unit, plan_batches, rows_per_pass
from .types import EngineStats

__all__ = ["DeviceRunner", "DEFAULT_ROW_TOKENS", "DEFAULT_BATCH_TOKENS", "DEFAULT_READ_WINDOW"]

# Decoder row cap in tokens. Rerank-10 candidates (10 titles of ~10-25 tokens) fit one row; for
# 2,000 candidates, rows of 256 keep the per-row [H, T, T] bias+mask at 1.5 MiB (fp32) while the
# self-attention waste (T/2 keys per token on average) stays small next to the FFN and head.
# Not yet swept on a quiet machine: `python -m instructrec.bench.rerank_memory --row-tokens 128 256 512`.
DEFAULT_ROW_TOKENS = 256
DEFAULT_BATCH_TOKENS = 8192
DEFAULT_READ_WINDOW = 4096  # units sorted by length together (a window's scores sync once)


class DeviceRunner:
    """Runs units through a backend under the engine's token budgets, counting the work in `stats`."""

    def __init__(self, backend: Backend, *, batch_tokens: int, row_tokens: int, read_window: int,
                 chunk_tokens: int | None = None):
        from instructrec.kernels import default_chunk_tokens

        self.backend = backend
        self.device = backend.device
        self.batch_tokens, self.row_tokens = batch_tokens, row_tokens
        # LM-head rows per chunk: the kernels own the measured default (512 on CPU, 1024 on CUDA).
        self.read_window = read_window
        self.chunk_tokens = default_chunk_tokens(self.device) if chunk_tokens is None else chunk_tokens
        self._start_id = backend.cfg.decoder_start_token_id
        self._pad_id = backend.cfg.pad_token_id

    @torch.inference_mode()
    def run(self, units: list[Unit], stats: EngineStats) -> None:
        """Fill unit.scores (sum of token log-probs per candidate, [n_candidates] float64)."""
        for w in range(0, len(units), self.read_window):
            window = [pack_unit(u, self.row_tokens) for u in units[w:w + self.read_window]]
            slot_base = np.cumsum([0] + [len(u.targets) for u in window])
            sums = torch.zeros(int(slot_base[-1]), dtype=torch.float64, device=self.device)  # [slots]
            for batch in plan_batches(window, self.batch_tokens):
                self._run_batch([window[i] for i in batch], [int(slot_base[i]) for i in batch], sums, stats)
            host = sums.cpu().numpy()  # the one device->host sync of the window
            for u, base in zip(window, slot_base[:-1]):
                u.scores = _tie_identical_targets(u.targets, host[base:base + len(u.targets)].copy())

    def _run_batch(self, units: list[Unit], slot_base: list[int], sums: torch.Tensor, st: EngineStats) -> None:
        backend, dev = self.backend, self.device
        B = len(units)
        S = max(len(u.source) for u in units)
        src = np.full((B, S), self._pad_id, dtype=np.int64)
        for b, u in enumerate(units):
            src[b, :len(u.source)] = u.source
        src_t = torch.from_numpy(src).to(dev, non_blocking=True)  # [B, S]
        lengths = torch.tensor([len(u.source) for u in units]).to(dev, non_blocking=True)
        src_mask = torch.arange(S, device=dev)[None, :] < lengths[:, None]  # [B, S]
        enc = backend.encode(src_t, src_mask)  # [B, S, D]
        kv = backend.encoder_kv(enc)  # per decoder layer k, v [B, H, S, dk] (onnx: stacked), shared by all rows
        st.batches += 1
        st.encoder_passes += B
        st.encoder_tokens += sum(len(u.source) for u in units)
        st.padded_encoder_tokens += B * S
        st.candidates += sum(len(u.targets) for u in units)

        R = max(len(u.rows) for u in units)
        T = max(u.row_len for u in units)
        step = rows_per_pass(B, T, self.batch_tokens)
        for r0 in range(0, R, step):
            a = decoder_arrays(units, slot_base, self._start_id, self._pad_id, slice(r0, r0 + step))
            flat = np.flatnonzero(a.targets.reshape(-1) != IGNORE)  # real tokens, [N]
            ids = torch.from_numpy(a.ids).to(dev, non_blocking=True)  # [B, Rc, T]
            seg = torch.from_numpy(a.segments).to(dev, non_blocking=True)  # [B, Rc, T]
            h = backend.decode(ids, seg, kv, src_mask)  # [B, Rc, T, D]
            flat_t = torch.from_numpy(flat).to(dev, non_blocking=True)
            hidden = h.reshape(-1, h.shape[-1]).index_select(0, flat_t)  # [N, D]
            tgt = torch.from_numpy(a.targets.reshape(-1)[flat]).to(dev, non_blocking=True)  # [N]
            slots = torch.from_numpy(a.slots.reshape(-1)[flat]).to(dev, non_blocking=True)  # [N]
            lp = backend.head(hidden, tgt, self.chunk_tokens)  # [N] fp32, in token chunks
            sums.index_add_(0, slots, lp.double())
            st.decoder_passes += 1
            st.decoder_tokens += len(flat)
            st.padded_decoder_tokens += a.ids.size


def _tie_identical_targets(targets: list[np.ndarray], scores: np.ndarray) -> np.ndarray:
    """Give candidates whose titles tokenize to the same ids (titles that differ only in characters
    the tokenizer drops or maps to <unk>: "Game 東方" / "Game 游戏" with Flan-T5, doubled spaces) the
    score of the first of them. Their exact scores are equal, but each was computed at its own place
    in a packed row, and fp32 rounding there differs by ~1e-7 relative: without this the order among
    them came from the packing, so the same request ranked differently alone, in another batch or
    in another batch job chunk. Tied, the stable sort keeps their input order everywhere."""
    first: dict[bytes, int] = {}
    for c, y in enumerate(targets):
        k = first.setdefault(y.tobytes(), c)
        if k != c:
            scores[c] = scores[k]
    return scores
