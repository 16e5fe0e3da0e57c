"""A compact T5 encoder-decoder for scoring (gpt-fast style), loading Hugging Face T5 weights.

Only what candidate scoring needs: encode an instruction once, compute each decoder layer's
cross-attention keys/values once from it, then run the decoder over *packed* rows of candidates.

Decoder layout: tokens are [B, R, T] = B encoder items (instructions) x R rows x T tokens. Each
row holds several candidates back to back, each `[decoder_start, y_1 .. y_{n-1}]`. Self-attention
runs per row ([B*R, H, T, T]) with a block-diagonal causal mask (a token sees only earlier tokens
of its own candidate). Cross-attention runs per encoder item over all its R*T tokens
([B, H, R*T, S]), so the encoder's keys/values are shared by every row and candidate of that item
without a copy.

T5's self-attention bias depends only on (key position - query position). Inside one candidate
that difference equals the difference of the row indices, so the row-level bias is exactly the
bias a candidate would get decoded alone with positions starting at 0; across candidates the mask
removes everything. Packing is therefore exact, not an approximation.

T5 attention has no 1/sqrt(d) scaling (it is folded into the initialisation), hence scale=1.0.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelLoadError

__all__ = ["read_checkpoint_config", "T5Config", "T5", "WeightSlot", "weight_slots", "empty_model", "fill_model",
           "build_model", "random_model", "relative_position_bucket", "positions_of"]


def read_checkpoint_config(model_dir: Path) -> dict:
    """The parsed config.json of a T5 save_pretrained directory; ModelLoadError names what is wrong."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir}: model directory not found")
    cfg_file = model_dir / "config.json"
    if not cfg_file.exists():
        raise ModelLoadError(f"{cfg_file}: missing (a save_pretrained directory has config.json)")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{cfg_file}: not valid JSON ({e})") from e
    if raw.get("model_type") != "t5":
        raise ModelLoadError(f"{cfg_file}: model_type is {raw.get('model_type')!r}, expected 't5'")
    return raw


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_decoder_layers: int = 8
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False
    layer_norm_epsilon: float = 1e-6
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        act = self.feed_forward_proj.split("-")[-1]
        # Hugging Face maps "gated-gelu" to the tanh approximation ("gelu_new"); keep that.
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

    @classmethod
    def from_hf(cls, config: Any) -> "T5Config":
        """From a Hugging Face T5Config or the dict of its config.json."""
        if isinstance(config, dict):
            # config.json omits values equal to Hugging Face's defaults (e.g. tie_word_embeddings
            # true, feed_forward_proj "relu"): let transformers fill them in.
            from transformers import T5Config as HFT5Config

            config = HFT5Config.from_dict(config)
        d = config.to_dict()
        known = {f.name for f in fields(cls)}
        kw = {k: d[k] for k in known if k in d and d[k] is not None}
        if "decoder_start_token_id" not in kw:  # T5 starts decoding with the pad token
            kw["decoder_start_token_id"] = kw.get("pad_token_id", 0)
        cfg = cls(**kw)
        if cfg.activation not in _ACTIVATIONS:
            raise ValueError(f"feed_forward_proj {cfg.feed_forward_proj!r} is not supported; "
                             f"supported: relu, gelu, gelu_new, silu, optionally 'gated-'")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def relative_position_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Bucket of each relative position rel = key_pos - query_pos (T5's scheme): half the buckets
    are exact small distances, the other half logarithmic bins up to max_distance."""
    bucket = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (rel > 0).long() * num_buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)  # future keys (rel > 0) all fall in bucket 0 (and are masked)
    exact = num_buckets // 2
    log_bin = exact + (torch.log(dist.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                       * (num_buckets - exact)).long()
    log_bin = log_bin.clamp(max=num_buckets - 1)
    return bucket + torch.where(dist < exact, dist, log_bin)


def positions_of(row: torch.Tensor) -> torch.Tensor:
    """0, 1, .., L-1 (int64) for a [L] tensor `row` of the model's inputs, on its device: the
    running count of a ones tensor shaped like it, not torch.arange(L).

    Why not arange: in the exported graphs arange(L) is Shape -> Gather -> Range. onnxruntime's CUDA
    partitioner (GetCpuPreferredNodes, onnxruntime/core/framework/fallback_cpu_capability.cc) puts
    on the CPU every node downstream of a Shape whose inputs are all CPU tensors, small initializers
    (<= 100 elements) or graph inputs, unless the CUDA kernel reads that input on the host; its Range
    kernel reads none there (it copies start/limit/delta from the device), so Range, then the
    [L, L] relative positions, buckets and causal comparisons built on it would run on the CPU and
    be copied to the GPU on every run. ones_like exports as ConstantOfShape, whose CUDA kernel reads
    its shape input on the host and writes on the device; CumSum follows on the device. The
    values are the same integers as arange's, so results are bit-identical."""
    return torch.ones_like(row).cumsum(0) - 1


class RMSNorm(nn.Module):
    """T5's layer norm: no mean, no bias; the variance is accumulated in fp32 for bf16 inputs."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., D] in fp32 or the weight's dtype -> [..., D] in the weight's dtype (the next
        matmul's input). Same arithmetic as Hugging Face's T5LayerNorm; on CPU, x * x and an
        fp32 * fp32 product avoid pow and torch's mixed bf16 * fp32 path (22 -> 11 ms per
        [16, 231, 768] bf16 tensor, one thread)."""
        xf = x.float()
        var = (xf * xf).mean(-1, keepdim=True)
        return self.weight * (xf * torch.rsqrt(var + self.eps)).to(self.weight.dtype)


def _residual_add(x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """x + update, in x's dtype: the residual stream stays fp32 when the weights are bf16."""
    return x + (update if update.dtype == x.dtype else update.to(x.dtype))


class FeedForward(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gated = cfg.is_gated
        # Gated: wi_0 and wi_1 fused into one [2*d_ff, D] matmul (one GEMM instead of two).
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff * (2 if self.gated else 1), bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.act = _ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.wi(x)
        if self.gated:
            gate, lin = h.chunk(2, dim=-1)
            h = self.act(gate) * lin
        else:
            h = self.act(h)
        return self.wo(h)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.h, self.dk = cfg.num_heads, cfg.d_kv
        inner = cfg.num_heads * cfg.d_kv
        self.norm1 = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.qkv = nn.Linear(cfg.d_model, 3 * inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.norm2 = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape  # x: [B, S, D]; mask: [B, H, S, S] additive (position bias + padding)
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, self.h, self.dk).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)  # [B, H, S, dk]
        x = _residual_add(x, self.o(a.transpose(1, 2).reshape(B, S, self.h * self.dk)))
        return _residual_add(x, self.ffn(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.h, self.dk = cfg.num_heads, cfg.d_kv
        inner = cfg.num_heads * cfg.d_kv
        eps = cfg.layer_norm_epsilon
        self.norm1 = RMSNorm(cfg.d_model, eps)
        self.qkv = nn.Linear(cfg.d_model, 3 * inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.norm2 = RMSNorm(cfg.d_model, eps)
        self.cross_q = nn.Linear(cfg.d_model, inner, bias=False)
        self.cross_kv = nn.Linear(cfg.d_model, 2 * inner, bias=False)
        self.cross_o = nn.Linear(inner, cfg.d_model, bias=False)
        self.norm3 = RMSNorm(cfg.d_model, eps)
        self.ffn = FeedForward(cfg)

    def encoder_kv(self, enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = enc.shape  # enc: [B, S, D] -> k, v: [B, H, S, dk], computed once per instruction
        k, v = self.cross_kv(enc).view(B, S, 2, self.h, self.dk).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, self_mask: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                cross_mask: torch.Tensor) -> torch.Tensor:
        B, R, T, D = x.shape  # x: [B, R, T, D]; self_mask: [B*R, H, T, T]; cross_mask: [B, 1, 1, S]
        HD = self.h * self.dk
        q, k, v = self.qkv(self.norm1(x)).view(B * R, T, 3, self.h, self.dk).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=self_mask, scale=1.0)  # [B*R, H, T, dk]
        x = _residual_add(x, self.o(a.transpose(1, 2).reshape(B, R, T, HD)))
        q = self.cross_q(self.norm2(x)).view(B, R * T, self.h, self.dk).transpose(1, 2)  # [B, H, R*T, dk]
        a = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=cross_mask, scale=1.0)
        x = _residual_add(x, self.cross_o(a.transpose(1, 2).reshape(B, R, T, HD)))
        return _residual_add(x, self.ffn(self.norm3(x)))


class T5(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.enc_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
        self.dec_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.enc_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers))
        self.dec_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Parameter(
            torch.empty(cfg.vocab_size, cfg.d_model))

    @property
    def residual_dtype(self) -> torch.dtype:
        """The residual stream's dtype: fp32 also when the weights are bf16. Each layer's output
        is added to a stream that keeps 24 bits instead of 8, so bf16 rounding does not compound
        over the layers, for one fp32 add per sublayer; matmuls, attention and norm outputs stay
        bf16. Measured on a random flan-t5-base shape, 150 rerank-10 requests against fp32: top-1
        agreement 150/150 (149/150 with a bf16 stream), max score error 5.5 (8.3) on scores near
        -700."""
        return torch.float32 if self.shared.weight.dtype == torch.bfloat16 else self.shared.weight.dtype

    @property
    def lm_weight(self) -> torch.Tensor:  # [V, D]
        return self.shared.weight if self.lm_head is None else self.lm_head

    def _bias(self, table: nn.Embedding, positions: torch.Tensor, bidirectional: bool) -> torch.Tensor:
        """positions: [L] int64, 0 .. L-1 (`positions_of`) -> T5's relative position bias [1, H, L, L]."""
        rel = positions[None, :] - positions[:, None]  # [L, L]: key position - query position
        b = relative_position_bucket(rel, bidirectional, self.cfg.relative_attention_num_buckets,
                                     self.cfg.relative_attention_max_distance)
        return table(b).permute(2, 0, 1).unsqueeze(0)  # [1, H, L, L]

    def encode(self, ids: torch.Tensor, mask: torch.Tensor, collect: list | None = None) -> torch.Tensor:
        """ids, mask (bool, True = token): [B, S] -> encoder output [B, S, D] (final norm applied)."""
        x = self.shared(ids)  # [B, S, D]
        neg = torch.finfo(x.dtype).min
        pad = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, neg)
        x = x.to(self.residual_dtype)
        # contiguous(): the sum takes the permuted strides of the bias table, and SDPA would copy
        # a non-contiguous mask in every layer (12 copies of [B, H, S, S] on flan-t5-base).
        attn = (self._bias(self.enc_bias, positions_of(ids[0]), True) + pad[:, None, None, :]).contiguous()
        for layer in self.encoder:  # attn: [B, H, S, S]
            x = layer(x, attn)
            if collect is not None:
                collect.append(x)
        return self.enc_norm(x)

    def encoder_kv(self, enc: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [layer.encoder_kv(enc) for layer in self.decoder]

    def decode(self, ids: torch.Tensor, segments: torch.Tensor, kv: list, src_mask: torch.Tensor,
               collect: list | None = None) -> torch.Tensor:
        """ids, segments: [B, R, T] (segments: candidate number within the row, equal numbers attend
        to each other causally; padding gets its own number); kv: encoder_kv() of the B items;
        src_mask: [B, S] bool. Returns the final hidden states [B, R, T, D], ready for the LM head
        (tied heads already rescaled by d_model**-0.5)."""
        B, R, T = ids.shape
        x = self.shared(ids)  # [B, R, T, D]
        neg = torch.finfo(x.dtype).min
        seg = segments.view(B * R, T)
        idx = positions_of(ids[0, 0])  # [T]
        allowed = (seg[:, :, None] == seg[:, None, :]) & (idx[None, :] <= idx[:, None])  # [B*R, T, T]
        block = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, neg)
        self_mask = (self._bias(self.dec_bias, idx, False) + block[:, None]).contiguous()  # [B*R, H, T, T]
        cross_mask = torch.zeros(src_mask.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~src_mask, neg)[:, None, None, :]  # [B, 1, 1, S]
        x = x.to(self.residual_dtype)
        for layer, layer_kv in zip(self.decoder, kv):
            x = layer(x, self_mask, layer_kv, cross_mask)
            if collect is not None:
                collect.append(x)
        x = self.dec_norm(x)  # in the weights' dtype
        if self.lm_head is None:
            x = x * (self.cfg.d_model ** -0.5)
        return x


# ---- Hugging Face weights -> this module's parameters -------------------------------------------
#
# One table (`weight_slots`) says where every Hugging Face T5ForConditionalGeneration tensor goes.
# Fused parameters (self-attention qkv, the gated FFN's wi_0 + wi_1, cross-attention k + v) are
# allocated once and each Hugging Face tensor is copied into its rows, so a checkpoint can be read
# one tensor at a time (engine/loading.py streams safetensors this way): peak host memory is the
# model plus one tensor, never a second copy of the state dict.

# Names Hugging Face also saves for the shared embedding (tied copies); read only when
# "shared.weight" itself is absent.
_SHARED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


@dataclass(frozen=True)
class WeightSlot:
    """Rows [start, stop) of parameter `param` hold the Hugging Face tensor `hf_name`, of `shape`."""

    hf_name: str
    param: str
    start: int
    stop: int
    shape: tuple[int, ...]


def _hf_sources(cfg: T5Config) -> dict[str, list[str]]:
    """This module's parameter name -> the Hugging Face tensors stacked (dim 0) into it."""

    def ffn(prefix: str) -> list[str]:
        dense = f"{prefix}.DenseReluDense"
        return [f"{dense}.wi_0.weight", f"{dense}.wi_1.weight"] if cfg.is_gated else [f"{dense}.wi.weight"]

    out: dict[str, list[str]] = {
        "shared.weight": ["shared.weight"],
        "enc_bias.weight": ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"],
        "dec_bias.weight": ["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"],
        "enc_norm.weight": ["encoder.final_layer_norm.weight"],
        "dec_norm.weight": ["decoder.final_layer_norm.weight"],
    }
    if not cfg.tie_word_embeddings:
        out["lm_head"] = ["lm_head.weight"]
    for i in range(cfg.num_layers):
        p, att = f"encoder.block.{i}.layer", f"encoder.block.{i}.layer.0.SelfAttention"
        out[f"encoder.{i}.norm1.weight"] = [f"{p}.0.layer_norm.weight"]
        out[f"encoder.{i}.qkv.weight"] = [f"{att}.{n}.weight" for n in "qkv"]
        out[f"encoder.{i}.o.weight"] = [f"{att}.o.weight"]
        out[f"encoder.{i}.norm2.weight"] = [f"{p}.1.layer_norm.weight"]
        out[f"encoder.{i}.ffn.wi.weight"] = ffn(f"{p}.1")
        out[f"encoder.{i}.ffn.wo.weight"] = [f"{p}.1.DenseReluDense.wo.weight"]
    for i in range(cfg.num_decoder_layers):
        p = f"decoder.block.{i}.layer"
        att, cross = f"{p}.0.SelfAttention", f"{p}.1.EncDecAttention"
        out[f"decoder.{i}.norm1.weight"] = [f"{p}.0.layer_norm.weight"]
        out[f"decoder.{i}.qkv.weight"] = [f"{att}.{n}.weight" for n in "qkv"]
        out[f"decoder.{i}.o.weight"] = [f"{att}.o.weight"]
        out[f"decoder.{i}.norm2.weight"] = [f"{p}.1.layer_norm.weight"]
        out[f"decoder.{i}.cross_q.weight"] = [f"{cross}.q.weight"]
        out[f"decoder.{i}.cross_kv.weight"] = [f"{cross}.k.weight", f"{cross}.v.weight"]
        out[f"decoder.{i}.cross_o.weight"] = [f"{cross}.o.weight"]
        out[f"decoder.{i}.norm3.weight"] = [f"{p}.2.layer_norm.weight"]
        out[f"decoder.{i}.ffn.wi.weight"] = ffn(f"{p}.2")
        out[f"decoder.{i}.ffn.wo.weight"] = [f"{p}.2.DenseReluDense.wo.weight"]
    return out


def weight_slots(cfg: T5Config) -> dict[str, WeightSlot]:
    """Every Hugging Face tensor the engine reads, by name, with the rows it fills."""
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in T5(cfg).named_parameters()}
    slots: dict[str, WeightSlot] = {}
    for param, names in _hf_sources(cfg).items():
        rows = shapes[param][0] // len(names)
        for k, name in enumerate(names):
            slots[name] = WeightSlot(name, param, k * rows, (k + 1) * rows, (rows, *shapes[param][1:]))
    return slots


def empty_model(cfg: T5Config, dtype: torch.dtype, device: torch.device) -> T5:
    """A model whose parameters are allocated once, uninitialised, directly in `dtype` on `device`."""
    with torch.device("meta"):
        model = T5(cfg).to(dtype)
    return model.to_empty(device=device).eval().requires_grad_(False)


def fill_model(cfg: T5Config, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
               device: torch.device) -> T5:
    """A ready-to-run model (eval mode, no grads) from (Hugging Face name, tensor) pairs, read one
    at a time: each is copied (converted to `dtype`, moved to `device`) into its rows of a model
    allocated once, so the result never shares memory with the tensors given. Tensors the engine
    does not read are skipped. Raises KeyError listing every missing Hugging Face name, and
    ValueError naming a tensor whose shape differs from what `cfg` makes."""
    model = empty_model(cfg, dtype, device)
    params = dict(model.named_parameters())
    slots = weight_slots(cfg)
    shared = slots["shared.weight"]
    filled: set[str] = set()
    with torch.no_grad():
        for name, tensor in tensors:
            slot = slots.get(name)
            if slot is None and name in _SHARED_ALIASES and shared.hf_name not in filled:
                slot = shared  # a checkpoint that saved only a tied copy of the embedding
            if slot is None:
                continue
            if tuple(tensor.shape) != slot.shape:
                raise ValueError(f"{name} has shape {list(tensor.shape)} in the checkpoint, "
                                 f"{list(slot.shape)} expected from the configuration")
            params[slot.param][slot.start:slot.stop].copy_(tensor)
            filled.add(slot.hf_name)
    missing = [name for name in slots if name not in filled]
    if missing:
        raise KeyError(", ".join(missing))
    return model


def build_model(cfg: T5Config, hf_state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device) -> T5:
    """fill_model from an in-memory Hugging Face state dict (the weights are copied)."""
    return fill_model(cfg, hf_state_dict.items(), dtype, device)


def _initial_std(hf_name: str, cfg: T5Config) -> float | None:
    """Hugging Face's T5 initialisation (T5PreTrainedModel._init_weights, initializer_factor 1):
    the std of the normal a tensor is drawn from; None for layer norms (ones)."""
    inner = cfg.num_heads * cfg.d_kv
    if hf_name.endswith("layer_norm.weight"):
        return None
    if hf_name in ("shared.weight", "lm_head.weight"):
        return 1.0
    if hf_name.endswith("relative_attention_bias.weight"):
        return cfg.d_model ** -0.5
    if hf_name.endswith(("SelfAttention.q.weight", "EncDecAttention.q.weight")):
        return (cfg.d_model * cfg.d_kv) ** -0.5
    if hf_name.endswith(("Attention.o.weight", "EncDecAttention.o.weight")):
        return inner ** -0.5
    if hf_name.endswith("DenseReluDense.wo.weight"):
        return cfg.d_ff ** -0.5
    return cfg.d_model ** -0.5  # k, v, wi, wi_0, wi_1


def random_model(cfg: T5Config, dtype: torch.dtype, device: torch.device, seed: int = 0) -> T5:
    """A model with seeded random weights, drawn as Hugging Face initialises T5 (per tensor, so the
    same seed gives the same weights on any device and dtype, and host memory holds one tensor at
    a time). For speed and memory work only: its scores mean nothing."""
    generator = torch.Generator().manual_seed(seed)
    slots = weight_slots(cfg)

    def draw() -> Iterator[tuple[str, torch.Tensor]]:
        for name, slot in slots.items():
            std = _initial_std(name, cfg)
            yield name, (torch.ones(slot.shape) if std is None else torch.randn(slot.shape, generator=generator) * std)

    return fill_model(cfg, draw(), dtype, device)
