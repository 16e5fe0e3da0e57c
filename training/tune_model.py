"""The model side of training: where the weights come from (`engine.sources.resolve_model`), the
tokenizer, the precision, the trainable model (full or LoRA), the optimiser and the loss.

Every check here runs before the first step and raises an `InputError` naming the flag.
"""

from __future__ import annotations

import functools
import logging

from instructrec.engine.errors import InputError, ModelLoadError
from instructrec.engine.sources import CHECKPOINT, RANDOM, ModelSource, resolve_model

from .tune_config import TrainConfig

log = logging.getLogger(__name__)


def resolve_source(cfg: TrainConfig) -> tuple[ModelSource, object]:
    """(ModelSource, T5Config) of `--model`: a folder, a Hub id (at `--revision`) or random:<shape>.
    A bare shape name is refused by the resolver (it could mean pretrained or random weights)."""
    from transformers import AutoConfig, T5Config

    source = resolve_model(cfg.model, revision=cfg.revision, allowed=(CHECKPOINT, RANDOM))
    if source.is_random:
        config = T5Config.from_dict(source.config())
    else:
        config = AutoConfig.from_pretrained(source.path)
        if config.model_type != "t5":
            raise InputError("model", f"{source.describe()} is a {config.model_type!r} model, not T5",
                             "pass a T5 / Flan-T5 checkpoint")
    if cfg.dropout is not None:
        config.dropout_rate = cfg.dropout
    config.use_cache = False
    return source, config


def load_tokenizer(cfg: TrainConfig, source: ModelSource):
    """`--tokenizer` (a folder or Hub id) or the checkpoint's own, through the engine's one loader."""
    from instructrec.engine.loading import load_tokenizer as engine_load_tokenizer

    spec = cfg.tokenizer if cfg.tokenizer is not None else source.path
    if spec is None:
        raise InputError("tokenizer", f"model {cfg.model!r} has random weights and no tokenizer",
                         "pass --tokenizer DIR (e.g. ../shared/assets/flan-t5-tokenizer)")
    tokenizer = engine_load_tokenizer(spec)
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise InputError("tokenizer", f"{spec} defines no pad or eos token", "use a T5 tokenizer")
    return tokenizer


def check_vocabulary(tokenizer, model_config) -> None:
    """The tokenizer's ids must all index the model's embedding (T5: 32100 tokens in 32128 rows)."""
    if len(tokenizer) > model_config.vocab_size:
        raise InputError(
            "tokenizer", f"has {len(tokenizer)} tokens but the model's vocabulary holds "
            f"{model_config.vocab_size} (ids past it would index outside the embedding)",
            "use the tokenizer the model was trained with, or a model of vocab_size >= "
            f"{len(tokenizer)}")


def resolve_device(cfg: TrainConfig, world_size: int) -> bool:
    """Whether the processes run on CPU (accelerate's `cpu=`); GPUs are assigned per process by
    accelerate (local rank), so `cuda:N` is for a single process only."""
    import torch

    if cfg.device == "cpu":
        return True
    if not torch.cuda.is_available():
        if cfg.device != "auto":
            raise InputError("device", f"{cfg.device} asked for but CUDA is not available", "use --device cpu or auto")
        return True
    if cfg.device.startswith("cuda:"):
        if world_size > 1:
            raise InputError("device", f"{cfg.device} names one GPU but {world_size} processes run",
                             "use --device cuda (each process takes the GPU of its local rank)")
        torch.cuda.set_device(int(cfg.device.split(":")[1]))
    return False


def resolve_precision(cfg: TrainConfig, device_type: str) -> str:
    """"bf16" or "fp32": `auto` follows engine.capabilities, the project's one precision policy."""
    import torch

    from instructrec.engine.capabilities import auto_dtype_name

    if cfg.precision == "auto":
        return "bf16" if auto_dtype_name(device_type, cfg.threads or torch.get_num_threads()) == "bfloat16" else "fp32"
    if cfg.precision == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError("precision", "bf16 asked for but this GPU has no bf16 support", "use --precision fp32")
    return cfg.precision


def require_peft():
    try:
        import peft
    except ImportError as exc:
        raise InputError("lora_r", "LoRA needs the peft package, which is not installed",
                         "pip install 'instructrec[lora]' (or pip install peft)") from exc
    return peft


def random_t5(config):
    """A T5ForConditionalGeneration of `config` with random weights drawn from torch's current
    seed, its untied LM head rescaled: what training from `random:<shape>` starts from."""
    import torch
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration(config)
    # HF draws an untied LM head with std 1.0, so initial logits have std ~sqrt(d_model)
    # (16 for t5-mini) and the first losses are 35-70 nats; std d_model^-0.5 (the Mesh TF
    # init of T5 v1.1's separate logits layer) starts near log(32128) = 10.4 instead.
    with torch.no_grad():
        model.lm_head.weight.mul_(config.d_model ** -0.5)
    return model


def build_model(cfg: TrainConfig, source: ModelSource, config):
    """The trainable model on CPU in fp32: the source's weights, or a seeded random init; LoRA
    adapters around it when lora_r > 0. A resumed run overwrites the weights from its checkpoint
    (accelerate's load_state), so this is the same for new and resumed runs."""
    import torch
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(cfg.seed)
    if source.is_random:
        model = random_t5(config)
    else:
        try:
            model = T5ForConditionalGeneration.from_pretrained(source.path, config=config, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model: cannot load weights from {source.describe()}: {exc}") from exc
    if cfg.lora_r:
        peft = require_peft()
        lora = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                               target_modules=list(cfg.lora_targets), task_type="SEQ_2_SEQ_LM")
        try:
            model = peft.get_peft_model(model, lora)
        except ValueError as exc:
            raise InputError("lora_targets", str(exc), "T5 linear layers are q, k, v, o, wi_0, wi_1, wo") from exc
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) and keeps dropout's RNG.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def build_optimizer(cfg: TrainConfig, model, fused: bool = True):
    """The run's optimiser. AdamW takes torch's fused kernel (one pass over each tensor for the
    whole update) where every parameter is a plain floating tensor on the CPU or a CUDA device:
    on an AVX2 CPU its step over t5-micro's 10M parameters (8.2M of them the embedding and the
    head) ran in ~20 ms where the per-tensor loop took 70-150 ms (1 thread); the whole step gained
    1.24x (docs/benchmarks.md, "The same on an AVX2-only CPU").
    `fused=False` for sharded models (FSDP, DeepSpeed), whose parameters are not plain tensors."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.resolved_lr()
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed external lr (relative_step False) so warm-up and decay come from the schedule,
        # and scale_parameter False: with it Adafactor multiplies lr by each tensor's RMS, which on
        # a random init ranges 0.05 (embeddings) to 1 (norms) and would make lr mean a different
        # thing per tensor. Update clipping at RMS 1.0 and decay -0.8 are the paper's defaults.
        return Adafactor(params, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False,
                         clip_threshold=1.0, decay_rate=-0.8, beta1=None, weight_decay=cfg.weight_decay)
    fused = fused and all(type(p) is torch.nn.Parameter and p.is_floating_point()
                          and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8,
                             fused=fused or None)


def _swap_children(model, kind: type, replacement) -> int:
    """Replace every submodule of exactly type `kind` by `replacement(old)`; how many were replaced."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is kind:
                setattr(module, name, replacement(child))
                swapped += 1
    return swapped


def install_fused_activations(model) -> int:
    """Swap each feed-forward's tanh-approximated GELU (Hugging Face's `gelu_new`, what T5 v1.1
    and Flan-T5's `gated-gelu` use) from its Python expression, eight elementwise operators
    forward and more backward, for torch's single fused kernel of the same formula
    (`torch.nn.GELU(approximate="tanh")`, which the engine runs too: engine/model.py). At d_model
    128 a training step is hundreds of small operators whose fixed cost, not their FLOPs, sets the
    time (docs/benchmarks.md). No parameter or config changes, so a saved checkpoint is the same.
    Returns how many activations were swapped (0 for a ReLU T5)."""
    import torch
    from transformers.activations import NewGELUActivation

    return _swap_children(model, NewGELUActivation, lambda _: torch.nn.GELU(approximate="tanh"))


@functools.cache
def _fused_t5_norm_class():
    """The module install_fused_norms puts in place of Hugging Face's T5LayerNorm: the same weight
    Parameter under the same name, the same function (weight * x / sqrt(mean(x^2) + eps), the
    variance in fp32), and a hand-written backward: r * (g*w - n * mean(g*w*n)) for x (n the
    normalised x, r the inverse RMS) and sum(g*n) for the weight. Autograd through Hugging Face's
    expression records about fourteen small operators per call; this runs eight, and keeps n and r
    rather than every intermediate. Built on first use (torch is imported lazily here)."""
    import torch

    class RMSNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps):
            # The variance in fp32 and n in x's dtype promoted with it, as Hugging Face's.
            r = torch.rsqrt(x.float().square().mean(-1, keepdim=True).add_(eps))
            n = x * r
            if weight.dtype in (torch.float16, torch.bfloat16):  # as Hugging Face's T5LayerNorm
                n = n.to(weight.dtype)
            ctx.save_for_backward(n, r, weight)
            ctx.x_dtype = x.dtype
            return weight * n

        @staticmethod
        def backward(ctx, grad):
            n, r, weight = ctx.saved_tensors
            wide = torch.promote_types(n.dtype, torch.float32)
            n_wide, g_wide = n.to(wide), grad.to(wide)
            grad_weight = (g_wide * n_wide).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype)
            gw = g_wide * weight.to(wide)
            grad_x = (gw - n_wide * (gw * n_wide).mean(-1, keepdim=True)).mul_(r)
            return grad_x.to(ctx.x_dtype), grad_weight, None

    class FusedT5LayerNorm(torch.nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.weight = norm.weight
            self.variance_epsilon = norm.variance_epsilon

        def forward(self, hidden_states):
            return RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)

    return FusedT5LayerNorm


def install_fused_norms(model) -> int:
    """Swap each of T5's RMS norms (Hugging Face's `T5LayerNorm`) for `_fused_t5_norm_class()`:
    fewer, larger operators per call for the same function, the same parameters and state-dict
    names, so a saved checkpoint is the same. Returns how many were swapped."""
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return _swap_children(model, T5LayerNorm, _fused_t5_norm_class())


def install_hidden_states_head(model):
    """Swap the T5's `lm_head` for `training.loss.HiddenStatesHead` (same weight, same state-dict
    name) so that the forward returns decoder states and `sequence_nll_sum` computes the head and
    log-softmax on real target tokens only: on the Video Games instructions two thirds of a batch's
    target positions are padding. Returns the stand-in (its `.weight` is the head). Not for sharded
    models (FSDP / DeepSpeed hold the weight as a shard outside the forward): they keep the full head."""
    from .loss import HiddenStatesHead

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = HiddenStatesHead(base.lm_head.weight)
    base.lm_head = head
    return head


def sequence_nll_sum(model, input_ids, attention_mask, decoder_input_ids, labels, head=None,
                     head_rows_multiple: int = 1):
    """Summed token NLL of `labels` (-100 ignored), a 0-d fp32 tensor. Summed, not averaged, so
    that the caller weights micro-batches and processes by their target tokens; log-softmax runs
    in fp32 even under bf16 mixed precision. With `head` (install_hidden_states_head) the model
    returns decoder states and the head runs on the real target tokens only; call it under the
    accelerator's autocast so that the head's matmul runs in the mixed precision too. With
    `head_rows_multiple` > 1 the head's rows are the real tokens followed by padding positions (their
    labels ignored) up to a multiple of it, where the batch has them: fewer distinct matmul shapes
    (tune_data.SHAPE_MULTIPLE), the same sum."""
    import torch
    import torch.nn.functional as F

    from .loss import linear_cross_entropy
    from .tune_data import padded_length

    out = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
    if head is None:
        return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), labels.reshape(-1),
                               ignore_index=-100, reduction="sum")
    keep = labels != -100
    if head_rows_multiple <= 1:
        return linear_cross_entropy(out[keep], head.weight, labels[keep])
    flat_labels, flat_keep = labels.reshape(-1), keep.reshape(-1)
    real = flat_keep.nonzero().squeeze(1)
    filler = (~flat_keep).nonzero().squeeze(1)
    rows = torch.cat([real, filler[:padded_length(len(real), head_rows_multiple) - len(real)]])
    return linear_cross_entropy(out.reshape(-1, out.shape[-1])[rows], head.weight, flat_labels[rows])


def ranked_sequence_losses(model, input_ids, attention_mask, decoder_input_ids, labels, negative_decoder_ids,
                           negative_labels, head=None, prefix_tokens: int = 0, score_form=None, empty_ids=None,
                           soft_targets=None):
    """The `--rank-negatives` objective's two sums over a batch of B rows: labels [B, T] are the rows'
    own targets, negative_labels [B x K, T'] their K negatives each, row-major (collate_negatives).

    Each instruction is encoded once; its states serve its own target and, repeated, its
    negatives, decoded in a second pass padded to their own length. A candidate's score is its
    summed token log-likelihood, the engine's default `normalize="sum"` score, or with
    `prefix_tokens` that of its first prefix_tokens tokens. `score_form` (engine.types.ScoreForm;
    None: the sum) turns that score into the evaluation's other forms: "mean" divides it by the
    tokens scored, "calibrated" with weight W subtracts W times the same score of the candidate
    under the empty instruction `empty_ids` [1, L] (its prior, computed without gradient).
    Returns (summed token NLL of the own targets, summed softmax cross-entropy of each own target
    among its row's K + 1 scores), 0-d fp32 tensors. With `soft_targets` [B, K + 1] (each row a
    distribution over [own target, negatives...], e.g. a teacher's) the cross-entropy is against
    it instead of the own target alone.
    """
    import torch
    import torch.nn.functional as F
    from transformers.modeling_outputs import BaseModelOutput

    from .loss import at_least_fp32, token_log_likelihoods

    rows = labels.shape[0]
    negatives = negative_labels.shape[0] // rows
    states = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state

    def scored(states, mask, decoder_ids, targets):
        """(per-sequence summed log-likelihood, the same over the first prefix_tokens tokens)."""
        out = model(encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=mask,
                    decoder_input_ids=decoder_ids).logits
        keep = targets != -100
        picked = targets[keep]
        if head is None:  # `out` holds the logits already
            token_lp = torch.log_softmax(at_least_fp32(out[keep]), dim=-1).gather(1, picked[:, None]).squeeze(1)
        else:
            token_lp = token_log_likelihoods(out[keep], head.weight, picked)
        where = keep.nonzero()
        total = token_lp.new_zeros(targets.shape[0]).index_add(0, where[:, 0], token_lp)
        if not prefix_tokens:
            return total, total
        early = where[:, 1] < prefix_tokens
        return total, token_lp.new_zeros(targets.shape[0]).index_add(0, where[early, 0], token_lp[early])

    def scored_tokens(targets):
        return (targets != -100).sum(1).clamp(max=prefix_tokens or targets.shape[1]).to(own_score.dtype)

    own_total, own_score = scored(states, attention_mask, decoder_input_ids, labels)
    _, negative_scores = scored(states.repeat_interleave(negatives, dim=0),
                                attention_mask.repeat_interleave(negatives, dim=0), negative_decoder_ids,
                                negative_labels)
    kind = score_form.kind if score_form is not None else "sum"
    if kind == "mean":
        own_score = own_score / scored_tokens(labels)
        negative_scores = negative_scores / scored_tokens(negative_labels)
    elif kind == "calibrated" and score_form.prior_weight:
        if empty_ids is None:
            raise ValueError("a calibrated ranking score needs the empty instruction's ids (empty_ids)")
        with torch.no_grad():
            empty_mask = torch.ones_like(empty_ids)
            empty_states = model.get_encoder()(input_ids=empty_ids, attention_mask=empty_mask,
                                               return_dict=True).last_hidden_state
            for_own = (empty_states.expand(rows, -1, -1), empty_mask.expand(rows, -1))
            for_negatives = (empty_states.expand(rows * negatives, -1, -1), empty_mask.expand(rows * negatives, -1))
            own_prior = scored(*for_own, decoder_input_ids, labels)[1]
            negative_prior = scored(*for_negatives, negative_decoder_ids, negative_labels)[1]
        own_score = own_score - score_form.prior_weight * own_prior
        negative_scores = negative_scores - score_form.prior_weight * negative_prior
    scores = torch.cat([own_score[:, None], negative_scores.view(rows, negatives)], dim=1)
    if soft_targets is not None:
        return -own_total.sum(), -(soft_targets.to(scores) * torch.log_softmax(scores, dim=1)).sum()
    target = torch.zeros(rows, dtype=torch.long, device=scores.device)
    return -own_total.sum(), F.cross_entropy(scores, target, reduction="sum")
