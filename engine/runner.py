"""The one piece of the engine that touches the device: units in, `unit.scores` out.

Per read window the units are packed into decoder rows and planned into batches (engine/packing.py);
each batch is one encoder pass and one cross-attention K/V computation for its instructions, then
decoder passes over the packed candidate rows, whose hidden states go through the chunked LM head
(log-softmax-gather, so [tokens x vocab] never exists).

Host to device: everything a batch needs is one int64 array (padded instruction ids, their
lengths, the concatenated target ids of its candidates and three numbers per candidate), written
in place into a persistent host buffer (pinned on CUDA) and sent with one non-blocking copy. The
device builds the padded [B, R, T] decoder inputs from it (`PassInputs`): no [B, R, T] array is
built on the host or copied. On CUDA two such buffers alternate, each guarded by an event, so the
host fills batch i+1 while the device still runs batch i.

Device to host: per-candidate sums stay on the device until the read window ends; then one
non-blocking copy into pinned memory, whose event is waited on only after the next window's
batches are launched. That wait is the loop's one host synchronisation per window (on CUDA:
nothing else in the loop waits for the device, see tests/engine/test_cuda.py's sync check).

Determinism: a candidate's score is the sum of its tokens' log-probs, taken by
`instructrec.kernels.segment_sum` (a plain indexed write and a row sum: no atomics), and every
index write here has one writer per element (tests/engine/test_runner.py checks that no
accumulating op runs in the loop). So on any device the same inputs with the same settings
(batch_tokens, row_tokens, read_window, chunk_tokens, pad_multiple, dtype, device model, library
versions) give the same bits, run after run: a resumed GPU job equals an uninterrupted one.
What does NOT hold bit for bit: the same request batched differently (other batch_tokens, other
neighbours, another read window) gets its tokens' log-probs from GEMMs and attention calls of other
shapes, which round differently. Measured on this project's CPU (48 rerank-10 requests, t5-tiny
shape, batch_tokens 2,048 or 600 or read_window 5 against the defaults): fp32 scores differ by up
to 1.8e-7 relative (2 to 6 of 48 requests bit-identical), bf16 by up to 3.1e-3 (12 to 26 of 48).
The fp64 sum adds nothing to that: it is exact, hence independent of the order of its terms,
whenever a candidate's fp32 token log-probs lie within a factor 2^21 of each other in size (256
tokens at most), and rounds at 1e-16 relative otherwise.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from .backend import Backend
from .errors import InputError
from .packing import BatchPlan, PassPlan, Unit, pack_unit, plan_batch, plan_batches, write_batch
from .types import EngineStats

__all__ = ["DeviceRunner", "PassInputs", "DEFAULT_ROW_TOKENS", "DEFAULT_BATCH_TOKENS", "CPU_BATCH_TOKENS",
           "CUDA_BATCH_TOKENS", "DEFAULT_READ_WINDOW", "default_batch_tokens", "default_pad_multiple"]

# Decoder row cap in tokens. Rerank-10 candidates (10 titles of ~10-25 tokens) fit one row; for
# 2,000 candidates, rows of 256 keep the per-row [H, T, T] bias+mask at 1.5 MiB (fp32) while the
# self-attention waste (T/2 keys per token on average) stays small next to the FFN and head.
# Not yet swept on a quiet machine: `python -m instructrec.bench.rerank_memory --row-tokens 128 256 512`.
DEFAULT_ROW_TOKENS = 256
# Encoder and decoder token slots per batch. CPU: 8,192, tuned on this project's 2-core CPU, where
# a batch of that size already keeps the matmuls at their peak and larger ones only add memory.
CPU_BATCH_TOKENS = 8192
# CUDA (reasoned, not yet timed: no GPU was at hand; `make gpu-check` sweeps 8,192 / this / 4x this
# and reports candidates/s and peak memory for each). A decoder pass of N tokens is ~2 N P FLOPs
# for P decoder parameters: at 32,768 tokens that is ~8.5 TFLOP for flan-t5-base (~20 ms on an
# H100-class GPU at ~400 TFLOP/s), against ~1 ms of kernel launches and Python per pass (~15
# kernels x 12 layers), so launch overhead stays under 5%; at 8,192 it would be ~20%. Memory
# stays modest on flan-t5-xl: the cross-attention K/V of 32,768 encoder slots are 24 layers x 2 x
# 32,768 x 2,048 x 2 B = 6 GiB in bf16, the decoder's FFN activations 32,768 x 5,120 x 2 x 2 B =
# 0.6 GiB, the self-attention masks of ~160 rows of 200 tokens 0.4 GiB.
CUDA_BATCH_TOKENS = 32768
# Kept for callers that import it: the CPU value. New code: default_batch_tokens(device).
DEFAULT_BATCH_TOKENS = CPU_BATCH_TOKENS
DEFAULT_READ_WINDOW = 4096  # units sorted by length together (a window's scores sync once)
# Host staging buffers in flight on CUDA: the host fills one while the other's copy (queued behind
# the device's current batch) is pending. More would let the host run further ahead without
# making the device any busier: it already has a whole batch queued.
_CUDA_STAGING_BUFFERS = 2


def default_batch_tokens(device: torch.device | str) -> int:
    """Token slots per batch for `device`: CPU_BATCH_TOKENS (measured) on CPU, CUDA_BATCH_TOKENS
    on a GPU. The one definition of the default; the Reranker and gpu-check ask here."""
    return CUDA_BATCH_TOKENS if torch.device(device).type == "cuda" else CPU_BATCH_TOKENS


def default_pad_multiple(device: torch.device | str, dtype: torch.dtype) -> int:
    """What the instruction length S and the decoder row length T of a batch are rounded up to.

    CUDA: SDPA's memory-efficient kernel (the one that takes an additive mask) needs the mask's
    last dimension and strides aligned to 8 elements, and pads a misaligned mask with a full copy
    in every attention call otherwise (torch's preprocess_mask / pad_bias, aten attention.cpp): so
    S and T go to multiples of 8, and of 16 in bf16, where 16 elements also fill the tensor cores'
    k = 16 MMA tiles. Costs at most 15 padded slots per row and per instruction (~4% of a 250-token
    rerank-10 instruction).
    CPU: 1 (no padding). Measured on this project's CPU (AMD EPYC Zen 4, 1 thread, shared machine,
    CPU time of Reranker.rank on rerank-10, fp32, min / median of 5-11 interleaved runs): padding
    to 8 gave t5-tiny (64 requests) 0.98 / 1.16 s against 1.01 / 1.14 s unpadded, and
    random:flan-t5-small (32 requests) 9.93 / 10.09 s against 9.83 / 10.05 s: no gain to pay
    for the padded slots.
    """
    if torch.device(device).type != "cuda":
        return 1
    return 16 if dtype in (torch.bfloat16, torch.float16) else 8


def _capacity(n: int) -> int:
    """Buffer sizes grow in powers of two, so a long run reallocates a handful of times."""
    return 1 << max(12, (n - 1).bit_length())


class _Staging:
    """Host buffers the batches' int64 inputs are written into, and the device buffer they go to.

    CPU: one plain buffer, used by the model as it is (no copy). CUDA: a ring of pinned buffers,
    each with an event recorded after the copy out of it; the host waits on that event before it
    writes into the buffer again (by then the device has long started the batch that read it).
    The device buffer is rewritten by the next batch's copy, which the stream orders after every
    kernel of the batch before."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        slots = _CUDA_STAGING_BUFFERS if self.cuda else 1
        self._host = [torch.empty(0, dtype=torch.int64, pin_memory=self.cuda) for _ in range(slots)]
        self._copied = [torch.cuda.Event() if self.cuda else None for _ in range(slots)]
        self._used = [False] * slots
        self._device = torch.empty(0, dtype=torch.int64, device=device) if self.cuda else None
        self._slot = 0

    def host(self, n: int) -> np.ndarray:
        """The next buffer, [n] int64, free to write: fill it, then call send(n)."""
        i = self._slot
        if self._used[i]:
            self._copied[i].synchronize()  # its last copy has left (normally long done)
        if self._host[i].numel() < n:
            self._host[i] = torch.empty(_capacity(n), dtype=torch.int64, pin_memory=self.cuda)
        return self._host[i].numpy()[:n]

    def send(self, n: int) -> torch.Tensor:
        """The buffer just filled, as a [n] int64 tensor on the device (one non-blocking copy)."""
        i = self._slot
        host = self._host[i][:n]
        if not self.cuda:
            return host
        if self._device.numel() < n:
            self._device = torch.empty(_capacity(n), dtype=torch.int64, device=self.device)
        on_device = self._device[:n]
        on_device.copy_(host, non_blocking=True)
        self._copied[i].record()
        self._used[i] = True
        self._slot = (i + 1) % len(self._host)
        return on_device


class _Readback:
    """One window's per-candidate sums on their way to the host (see DeviceRunner.run)."""

    def __init__(self, window: list[Unit], slot_base: np.ndarray, host: torch.Tensor, slots: np.ndarray,
                 event: "torch.cuda.Event | None"):
        self.window, self.slot_base, self.host, self.slots, self.event = window, slot_base, host, slots, event

    def finish(self) -> None:
        if self.event is not None:
            self.event.synchronize()  # the window's one wait for the device
        sums = np.empty(int(self.slot_base[-1]), dtype=np.float64)
        sums[self.slots] = self.host.numpy()
        for u, base in zip(self.window, self.slot_base[:-1]):
            u.scores = _tie_identical_targets(u.targets, sums[base:base + len(u.targets)].copy())


class DeviceRunner:
    """Runs units through a backend under the engine's token budgets, counting the work in `stats`."""

    def __init__(self, backend: Backend, *, batch_tokens: int | None = None, row_tokens: int = DEFAULT_ROW_TOKENS,
                 read_window: int = DEFAULT_READ_WINDOW, chunk_tokens: int | None = None,
                 pad_multiple: int | None = None, exact_head: bool = False):
        """batch_tokens: None for default_batch_tokens(device); chunk_tokens: None for the
        kernels' default_chunk_tokens(device); pad_multiple: None for default_pad_multiple.
        exact_head: the LM head's logits in fp32 where the default rounds them to the weights'
        dtype (bf16 weights on CPU; see TorchBackend.head): torch backend only."""
        from instructrec.kernels import default_chunk_tokens

        self.backend = backend
        self.device = backend.device
        self.batch_tokens = default_batch_tokens(self.device) if batch_tokens is None else batch_tokens
        self.row_tokens = row_tokens
        self.read_window = read_window
        # LM-head rows per chunk: the kernels own the measured default (512 on CPU, 1024 on CUDA).
        self.chunk_tokens = default_chunk_tokens(self.device) if chunk_tokens is None else chunk_tokens
        self.pad_multiple = (default_pad_multiple(self.device, backend.dtype) if pad_multiple is None
                             else pad_multiple)
        for name, value in (("batch_tokens", self.batch_tokens), ("row_tokens", row_tokens),
                            ("read_window", read_window), ("chunk_tokens", self.chunk_tokens),
                            ("pad_multiple", self.pad_multiple)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(name, f"must be a positive int, got {value!r}")
        if not isinstance(exact_head, bool):
            raise InputError("exact_head", f"must be True or False, got {exact_head!r}")
        if exact_head and not getattr(backend, "has_exact_head", False):
            raise InputError("exact_head", f"{type(backend).__name__} has no exact-head option (its LM head "
                             "is a fixed graph)", "drop exact_head, or load the checkpoint with backend='torch'")
        self.exact_head = exact_head
        self._start_id = backend.cfg.decoder_start_token_id
        self._pad_id = backend.cfg.pad_token_id
        # Made on the first run, under the device's context: pinned memory and events belong to
        # the GPU that is current when they are made (a runner on cuda:1 must not touch cuda:0).
        self._staging: _Staging | None = None
        # Pinned landing places of the window sums, two so that one window's copy can be in flight
        # while the previous one is read (CUDA only).
        self._landing: list[torch.Tensor] = []
        self._window_count = 0

    def _on_device(self) -> contextlib.AbstractContextManager:
        """CUDA: make the backend's GPU current, so streams, events and copies use it (cuda:1 too)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    @torch.inference_mode()
    def run(self, units: list[Unit], stats: EngineStats) -> None:
        """Fill unit.scores (sum of token log-probs per candidate, [n_candidates] float64).

        Window w's scores are read after window w+1's batches are launched, so on CUDA the device
        runs w+1 while the host waits for and hands out w's."""
        with self._on_device():
            if self._staging is None:
                self._staging = _Staging(self.device)
                if self.device.type == "cuda":
                    self._landing = [torch.empty(0, dtype=torch.float64, pin_memory=True) for _ in range(2)]
            pending: _Readback | None = None
            for w in range(0, len(units), self.read_window):
                window = [pack_unit(u, self.row_tokens) for u in units[w:w + self.read_window]]
                slot_base = np.cumsum([0] + [len(u.targets) for u in window])
                sums: list[torch.Tensor] = []  # per pass: [candidates] float64, on the device
                slots: list[np.ndarray] = []  # per pass: their window slots
                for batch in plan_batches(window, self.batch_tokens):
                    self._run_batch([window[i] for i in batch], slot_base[batch], sums, slots, stats)
                readback = self._read(window, slot_base, sums, slots)
                if pending is not None:
                    pending.finish()
                pending = readback
            if pending is not None:
                pending.finish()

    def _read(self, window: list[Unit], slot_base: np.ndarray, sums: list[torch.Tensor],
              slots: list[np.ndarray]) -> _Readback:
        values = torch.cat(sums)  # [window candidates] float64
        if self.device.type != "cuda":
            return _Readback(window, slot_base, values, np.concatenate(slots), None)
        i = self._window_count % len(self._landing)
        self._window_count += 1
        if self._landing[i].numel() < values.numel():  # its last window was finished before this one began
            self._landing[i] = torch.empty(_capacity(values.numel()), dtype=torch.float64, pin_memory=True)
        host = self._landing[i][:values.numel()]
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _Readback(window, slot_base, host, np.concatenate(slots), event)

    def _run_batch(self, units: list[Unit], slot_base: np.ndarray, sums: list[torch.Tensor],
                   slots: list[np.ndarray], st: EngineStats) -> None:
        backend, dev = self.backend, self.device
        batch = plan_batch(units, slot_base, self.batch_tokens, self.pad_multiple)
        write_batch(self._staging.host(batch.size), units, batch, self._pad_id)
        data = self._staging.send(batch.size)  # [size] int64 on the device
        B, S, T = batch.B, batch.S, batch.T
        src = data[:B * S].view(B, S)  # [B, S]
        src_mask = torch.arange(S, device=dev)[None, :] < data[batch.lengths_at:batch.targets_at, None]  # [B, S]
        enc = backend.encode(src, src_mask)  # [B, S, D]
        kv = backend.encoder_kv(enc)  # per decoder layer k, v [B, H, S, dk] (onnx: stacked), shared by all rows
        st.batches += 1
        st.encoder_passes += B
        st.encoder_tokens += sum(len(u.source) for u in units)
        st.padded_encoder_tokens += B * S
        st.candidates += sum(len(u.targets) for u in units)

        for p in batch.passes:
            x = PassInputs.build(data, batch, p, self._start_id, self._pad_id)
            h = backend.decode(x.ids, x.segments, kv, src_mask)  # [B, Rc, T, D]
            hidden = h.reshape(-1, h.shape[-1]).index_select(0, x.flat)  # [N, D]
            if self.exact_head:
                lp = backend.head(hidden, x.targets, self.chunk_tokens, exact=True)  # type: ignore[call-arg]
            else:
                lp = backend.head(hidden, x.targets, self.chunk_tokens)  # [N] fp32, in token chunks
            sums.append(_candidate_sums(lp, x.candidate, p.c1 - p.c0, p.longest))
            slots.append(p.slots)
            st.decoder_passes += 1
            st.decoder_tokens += p.t1 - p.t0
            st.padded_decoder_tokens += B * p.rows * T


@dataclass
class PassInputs:
    """One decoder pass's inputs, built on the device from the batch's upload:
    ids / segments [B, Rc, T] (padding: pad id / -1), and per real token (N of them, candidate
    by candidate) its target id, its flat position in [B*Rc*T] and its candidate (0..C-1)."""

    ids: torch.Tensor
    segments: torch.Tensor
    targets: torch.Tensor
    flat: torch.Tensor
    candidate: torch.Tensor

    @classmethod
    def build(cls, data: torch.Tensor, batch: BatchPlan, p: PassPlan, start_id: int, pad_id: int) -> "PassInputs":
        """data: the batch's upload (write_batch's buffer) on the device."""
        dev = data.device
        n = p.t1 - p.t0
        targets = data[batch.targets_at + p.t0:batch.targets_at + p.t1]  # [N]
        lengths = data[batch.cand_lengths_at + p.c0:batch.cand_lengths_at + p.c1]  # [C]
        starts = data[batch.cand_starts_at + p.c0:batch.cand_starts_at + p.c1]  # [C]
        shifts = data[batch.cand_shifts_at + p.c0:batch.cand_shifts_at + p.c1]  # [C]
        # output_size: the host knows N, so the device need not report it back (no sync).
        candidate = torch.repeat_interleave(lengths, output_size=n)  # [N] 0,0,..,1,1,..
        flat = torch.arange(n, device=dev) + shifts.index_select(0, candidate)  # [N] position in [B*Rc*T]
        # Decoder input of a token: the previous target of its candidate, the start token first.
        previous = targets.roll(1).index_fill_(0, starts, start_id)  # [N]
        slots = batch.B * p.rows * batch.T
        ids = torch.full((slots,), pad_id, dtype=torch.int64, device=dev).index_copy_(0, flat, previous)
        # Segment ids: the candidate's number in the pass (unique, so unique within its row).
        segments = torch.full((slots,), -1, dtype=torch.int64, device=dev).index_copy_(0, flat, candidate)
        shape = (batch.B, p.rows, batch.T)
        return cls(ids.view(shape), segments.view(shape), targets, flat, candidate)


def _candidate_sums(lp: torch.Tensor, candidate: torch.Tensor, n_candidates: int, longest: int) -> torch.Tensor:
    """[N] token log-probs -> [C] float64 per-candidate sums, deterministically on any device
    (each candidate's tokens are one contiguous run, as segment_sum requires; no check: the
    runner built `candidate` itself, and the check would sync)."""
    from instructrec.kernels import segment_sum

    return segment_sum(lp, candidate, n_candidates, longest, check=False)


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
