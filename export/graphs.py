"""The four graphs the engine runs under onnxruntime, as Optimum custom ONNX configs.

Files (instructrec.engine.onnx_backend.GRAPH_FILES): instructrec-source.onnx (encoder),
instructrec-cross-kv.onnx (encoder_kv), instructrec-candidates.onnx (decoder) and
instructrec-logprobs.onnx (lm_head); no name contains "encoder" or "decoder", the words Optimum's
ORTModelForSeq2SeqLM looks for, so Optimum's stock graphs can share the folder.

Why not Optimum's stock T5 graphs: `encoder_model` / `decoder_model` / `decoder_with_past_model`
take one target sequence per row and return full logits [B, T, 32128]. Scoring 10 candidates
with them means either repeating the instruction per candidate (10 encoder passes, the peer we
benchmark against) or materialising the [tokens x 32128] logits of a whole batch (2,000
candidates x 25 tokens = 6.4 GB fp32). The engine's design needs instead:

  encoder     input_ids [B, S], attention_mask [B, S]        -> last_hidden_state [B, S, D]
  encoder_kv  encoder_hidden_states [B, S, D]                -> cross_key_values [L, 2, B, H, S, dk]
  decoder     decoder_input_ids [B, R, T], decoder_segment_ids [B, R, T] (packed candidates; the
              block-diagonal causal mask and T5's relative bias are built inside the graph),
              encoder_attention_mask [B, S], cross_key_values      -> hidden_states [B, R, T, D]
  lm_head     hidden_states [N, D], labels [N]               -> log_probs [N] (the head matmul, then
              instructrec.kernels' plain-torch log-softmax-gather; the backend feeds it chunk_tokens
              rows at a time, so only [chunk x V] ever exists)

Why Optimum's custom-config route and not a hand-written torch.onnx call: Optimum owns the
export pipeline (dummy inputs from the config, input ordering from the forward signature,
dynamic axes, the dynamic-axes fix-up pass, external data for >2 GB graphs, tied-weight
deduplication, config / generation config / tokenizer saved beside the graphs), and the configs
below are the only model-specific part. Each graph wraps the engine's own modules
(instructrec.engine.model.T5), so ONNX and torch run the same code.

Cross K/V travel as ONE stacked tensor [L, 2, B, H, S, dk] rather than 2L named inputs: Optimum
orders and names inputs from the wrapped forward's signature (`ordered_inputs`), and a fixed
signature cannot name a per-layer list whose length depends on the checkpoint (8 layers for
flan-t5-small, 24 for XL). The stack costs one copy of K/V per instruction, not per candidate.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from optimum.exporters.onnx import OnnxConfig
from optimum.exporters.onnx.model_patcher import PatchingSpec
from optimum.utils import DummyInputGenerator, NormalizedConfig

from instructrec.engine import model as engine_model
from instructrec.engine.model import T5
from instructrec.engine.onnx_backend import GRAPH_FILES
from instructrec.engine.packing import IGNORE
from instructrec.kernels import log_softmax_gather_reference

__all__ = ["GRAPH_NAMES", "graph_file_stem", "where_in_float32", "EncoderGraph", "EncoderKVGraph", "DecoderGraph", "LMHeadGraph",
           "graph_modules", "graph_onnx_configs"]

GRAPH_NAMES = ("encoder", "encoder_kv", "decoder", "lm_head")


def graph_file_stem(name: str) -> str:
    """Optimum names each file after its submodel key: the key is the file name without .onnx."""
    return GRAPH_FILES[name].removesuffix(".onnx")


class _Graph(nn.Module):
    """Thinnest adapter Optimum needs around one of our modules: export_pytorch sets
    `model.config.return_dict` and ModelPatcher / values_override write `use_cache` on
    `model.config`, so a submodel must carry a Hugging Face config object; everything else
    (forward signature -> input order, tuple outputs -> output names) is plain nn.Module."""

    def __init__(self, t5: T5, hf_config):
        super().__init__()
        self.t5 = t5
        self.config = hf_config


class EncoderGraph(_Graph):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.t5.encode(input_ids, attention_mask > 0)  # [B, S, D]


class EncoderKVGraph(_Graph):
    """The cross-attention K/V of every decoder layer as ONE matmul and ONE transpose: the layers'
    cross_kv weights side by side ([L * 2 * H * dk, D], folded into one initializer at export),
    then [B, S, L, 2, H, dk] -> [L, 2, B, H, S, dk]. The same numbers as T5.encoder_kv (validated
    against it); traced per layer (matmul, split, transpose, then two stacks) the copies took 21% of
    this graph's time (flan-t5-small shape, B=8, S=300, onnxruntime profile, 1 thread)."""

    def forward(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        layers = self.t5.decoder
        B, S, _ = encoder_hidden_states.shape
        H, dk = layers[0].h, layers[0].dk
        weight = torch.cat([layer.cross_kv.weight for layer in layers])  # [L * 2 * H * dk, D]
        kv = (encoder_hidden_states @ weight.t()).view(B, S, len(layers), 2, H, dk)
        return kv.permute(2, 3, 0, 4, 1, 5).contiguous()  # [L, 2, B, H, S, dk]


class DecoderGraph(_Graph):
    def forward(self, decoder_input_ids: torch.Tensor, decoder_segment_ids: torch.Tensor,
                encoder_attention_mask: torch.Tensor, cross_key_values: torch.Tensor) -> torch.Tensor:
        kv = [(cross_key_values[i, 0], cross_key_values[i, 1]) for i in range(cross_key_values.shape[0])]
        return self.t5.decode(decoder_input_ids, decoder_segment_ids, kv, encoder_attention_mask > 0)


class LMHeadGraph(_Graph):
    """log_softmax(hidden @ W.T, fp32)[i, labels[i]], 0 where labels[i] == IGNORE: the function of
    instructrec.kernels.lm_head_log_softmax_gather for one chunk. The log-softmax-gather is the
    kernels layer's plain-torch definition (log_softmax_gather_reference), traced as it is."""

    def forward(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = hidden_states @ self.t5.lm_weight.t()  # [N, V], N <= chunk_tokens
        return log_softmax_gather_reference(logits, labels, ignore_index=IGNORE)  # [N] fp32


# Dummy sizes for tracing: all different, so that no two dynamic axes are confused by a trace
# that happens to see equal sizes.
_DUMMY = dict(batch=2, rows=3, row_tokens=5, source=7, tokens=9)


class PackedScoringDummyInputGenerator(DummyInputGenerator):
    """Inputs of the four graphs, consistent with each other (same B and S everywhere)."""

    SUPPORTED_INPUT_NAMES = ("input_ids", "attention_mask", "encoder_hidden_states", "decoder_input_ids",
                             "decoder_segment_ids", "encoder_attention_mask", "cross_key_values",
                             "hidden_states", "labels")

    def __init__(self, task: str, normalized_config: NormalizedConfig, **kwargs):
        self.task = task
        c = normalized_config.config
        self.vocab, self.d_model, self.heads = c.vocab_size, c.d_model, c.num_heads
        self.d_kv, self.layers = c.d_kv, c.num_decoder_layers

    def generate(self, input_name: str, framework: str = "pt", int_dtype: str = "int64",
                 float_dtype: str = "fp32"):
        B, R, T, S, N = (_DUMMY[k] for k in ("batch", "rows", "row_tokens", "source", "tokens"))
        if input_name in ("input_ids", "decoder_input_ids"):
            shape = [B, S] if input_name == "input_ids" else [B, R, T]
            return self.random_int_tensor(shape, self.vocab, framework=framework, dtype=int_dtype)
        if input_name in ("attention_mask", "encoder_attention_mask"):
            return self.random_mask_tensor([B, S], framework=framework, dtype=int_dtype)
        if input_name == "decoder_segment_ids":
            return self.random_int_tensor([B, R, T], 3, framework=framework, dtype=int_dtype)
        if input_name == "labels":
            return self.random_int_tensor([N], self.vocab, framework=framework, dtype=int_dtype)
        shapes = {"encoder_hidden_states": [B, S, self.d_model],
                  "cross_key_values": [self.layers, 2, B, self.heads, S, self.d_kv],
                  "hidden_states": [N, self.d_model]}
        return self.random_float_tensor(shapes[input_name], framework=framework, dtype=float_dtype)


def _sdpa_explicit(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """softmax(q k^T * scale + mask) v, written out. torch 2.13's TorchScript exporter fails on
    scaled_dot_product_attention(scale=1.0) with bfloat16 inputs ("ScalarType ComplexDouble is an
    unexpected tensor scalar type": the scale constant gets no ONNX type), and T5 always passes
    scale=1.0. Same math; the engine's modules call SDPA as they are (dropout_p and is_causal are
    never set by them)."""
    scores = query @ key.transpose(-2, -1)
    if scale is not None and scale != 1.0:
        scores = scores * scale
    if attn_mask is not None:
        scores = scores + attn_mask
    return torch.softmax(scores.float(), dim=-1).to(value.dtype) @ value


class _FunctionalExplicitSDPA:
    """torch.nn.functional with SDPA replaced, bound as `F` inside engine/model.py during a bf16
    export. Patching torch.nn.functional itself does not work: Optimum's ModelPatcher applies its
    own scaled_dot_product_attention patch after the config's specs, so the last one wins."""

    scaled_dot_product_attention = staticmethod(_sdpa_explicit)

    def __getattr__(self, name: str):
        return getattr(torch.nn.functional, name)


class _PackedOnnxConfig(OnnxConfig):
    NORMALIZED_CONFIG_CLASS = NormalizedConfig
    DUMMY_INPUT_GENERATOR_CLASSES = (PackedScoringDummyInputGenerator,)
    # Opset 17 has LayerNormalization and the SDPA decomposition the torch exporter emits; 18 is
    # Optimum's default and what onnxruntime 1.18+ runs everywhere.
    DEFAULT_ONNX_OPSET = 18
    # Optimum's own validation is switched off by export_model (it only logs a warning on a
    # mismatch); instructrec.export.validate runs ours and raises. Kept for callers of Optimum.
    ATOL_FOR_VALIDATION = 1e-4

    @property
    def values_override(self):  # our modules read no flags from the Hugging Face config
        return None

    @property
    def PATCHING_SPECS(self):  # noqa: N802 (Optimum's name). A fresh list: ModelPatcher extends it.
        if self.float_dtype != "bf16":
            return []  # fp32: the exporter's own SDPA decomposition is fine
        return [PatchingSpec(engine_model, "F", _FunctionalExplicitSDPA())]

    def fix_dynamic_axes(self, model_path, device: str = "cpu", dtype: str | None = None, input_shapes=None):
        """Optimum calls this on each freshly traced file, before anything runs it (its own fix-up
        opens an onnxruntime session): the moment to make a bf16 graph loadable on CUDA."""
        if self.float_dtype == "bf16":
            where_in_float32(model_path)
        super().fix_dynamic_axes(model_path, device=device, dtype=dtype, input_shapes=input_shapes)


_BF16 = 16  # onnx.TensorProto.BFLOAT16
_FLOAT = 1  # onnx.TensorProto.FLOAT


def where_in_float32(model_path) -> int:
    """Rewrite every Where on bfloat16 values as Cast -> Where in fp32 -> Cast back, in place;
    returns how many. onnxruntime registers Where for float, double, float16 and integer types on
    both the CUDA and the CPU provider, not for bfloat16 (its CUDA kernel list, and session creation
    on CPU: NOT_IMPLEMENTED for Where(16)), so a bf16 graph with one does not load at all. The masks
    built with masked_fill (decoder self-attention, cross-attention) are where they come from.
    Exact: Where selects, and bf16 -> fp32 -> bf16 round-trips every value."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path), load_external_data=False)
    typed = onnx.shape_inference.infer_shapes(model)  # element types of every intermediate value
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(typed.graph.value_info) + list(typed.graph.input) + list(typed.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    nodes, rewritten = [], 0
    for node in model.graph.node:
        if node.op_type != "Where" or types.get(node.output[0]) != _BF16:
            nodes.append(node)
            continue
        cond, x, y = node.input
        out = node.output[0]
        base = node.name or out
        nodes += [helper.make_node("Cast", [x], [f"{base}/x_fp32"], to=_FLOAT, name=f"{base}/cast_x"),
                  helper.make_node("Cast", [y], [f"{base}/y_fp32"], to=_FLOAT, name=f"{base}/cast_y"),
                  helper.make_node("Where", [cond, f"{base}/x_fp32", f"{base}/y_fp32"], [f"{base}/fp32"],
                                   name=f"{base}/where_fp32"),
                  helper.make_node("Cast", [f"{base}/fp32"], [out], to=_BF16, name=f"{base}/cast_back")]
        rewritten += 1
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        onnx.save(model, str(model_path))  # tensors kept in external data keep their references
    return rewritten


class EncoderOnnxConfig(_PackedOnnxConfig):
    @property
    def inputs(self):
        return OrderedDict(input_ids={0: "batch_size", 1: "encoder_sequence_length"},
                           attention_mask={0: "batch_size", 1: "encoder_sequence_length"})

    @property
    def outputs(self):
        return OrderedDict(last_hidden_state={0: "batch_size", 1: "encoder_sequence_length"})


class EncoderKVOnnxConfig(_PackedOnnxConfig):
    @property
    def inputs(self):
        return OrderedDict(encoder_hidden_states={0: "batch_size", 1: "encoder_sequence_length"})

    @property
    def outputs(self):
        return OrderedDict(cross_key_values={2: "batch_size", 4: "encoder_sequence_length"})


class DecoderOnnxConfig(_PackedOnnxConfig):
    @property
    def inputs(self):
        rows = {0: "batch_size", 1: "rows", 2: "row_tokens"}
        return OrderedDict(decoder_input_ids=dict(rows), decoder_segment_ids=dict(rows),
                           encoder_attention_mask={0: "batch_size", 1: "encoder_sequence_length"},
                           cross_key_values={2: "batch_size", 4: "encoder_sequence_length"})

    @property
    def outputs(self):
        return OrderedDict(hidden_states={0: "batch_size", 1: "rows", 2: "row_tokens"})


class LMHeadOnnxConfig(_PackedOnnxConfig):
    @property
    def inputs(self):
        return OrderedDict(hidden_states={0: "num_tokens"}, labels={0: "num_tokens"})

    @property
    def outputs(self):
        return OrderedDict(log_probs={0: "num_tokens"})


_CONFIGS = {"encoder": EncoderOnnxConfig, "encoder_kv": EncoderKVOnnxConfig,
            "decoder": DecoderOnnxConfig, "lm_head": LMHeadOnnxConfig}
_MODULES = {"encoder": EncoderGraph, "encoder_kv": EncoderKVGraph,
            "decoder": DecoderGraph, "lm_head": LMHeadGraph}


def graph_modules(t5: T5, hf_config) -> dict[str, nn.Module]:
    """The `fn_get_submodels` result: one wrapper per graph around the same engine T5, keyed by
    file stem (Optimum writes each as `<key>.onnx`)."""
    return {graph_file_stem(name): _MODULES[name](t5, hf_config).eval() for name in GRAPH_NAMES}


def graph_onnx_configs(hf_config, float_dtype: str) -> dict[str, OnnxConfig]:
    """The `custom_onnx_configs` argument: one config per graph, keyed like graph_modules (task is
    informational here)."""
    return {graph_file_stem(name): _CONFIGS[name](hf_config, task="feature-extraction", float_dtype=float_dtype)
            for name in GRAPH_NAMES}


def graph_inputs(name: str) -> list[str]:
    return list(_CONFIGS[name].inputs.fget(None))  # type: ignore[arg-type]


def graph_outputs(name: str) -> list[str]:
    return list(_CONFIGS[name].outputs.fget(None))  # type: ignore[arg-type]
