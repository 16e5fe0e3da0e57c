"""Validation during training: the loss on a fixed subset of valid rows (all processes, each on its
share), and HR@1 / NDCG@5 of the sequential-recommendation instances ranked by
`instructrec.engine.Reranker` (the main process only, through the inference path itself:
training holds no scorer of its own).

Memory: the engine is built from the weights the training model already holds, never from a deep
copy of it. Full fine-tuning on one process or DDP: straight from the unwrapped model. LoRA: the
adapters are merged into a CPU copy of the weights (the trained model stays unmerged, so its
frozen base is never perturbed by merge/unmerge rounding). FSDP / DeepSpeed ZeRO-3: the full
state dict that accelerate gathers to CPU on the main process. The engine itself goes to the
training device only if that device has room for it, else to CPU.
"""

from __future__ import annotations

import logging

import numpy as np

from .tune_data import SeqRecInstance, TokenizedRows, collate, head_rows_multiple, process_slots
from .tune_model import sequence_nll_sum

log = logging.getLogger(__name__)

# The engine copy goes to the training GPU only with this much headroom over its own size (the
# engine's activations, the allocator's fragmentation); otherwise it is built on CPU.
ENGINE_DEVICE_HEADROOM = 1.25
_PEFT_PREFIX = "base_model.model."


def validation_loss(accelerator, model, rows: TokenizedRows, batch_size: int, pad_id: int, start_id: int,
                    head=None, pad_multiple: int = 1) -> float:
    """Token-weighted mean NLL of `rows`, each process taking its slots of every global batch of
    the length-sorted rows (a zero-weight row where it has none, so sharded models stay in step);
    batches padded as the training step pads them (`pad_multiple`)."""
    import torch

    world, rank = accelerator.num_processes, accelerator.process_index
    order = np.argsort(-rows.source_lengths, kind="stable")
    nll = torch.zeros((), device=accelerator.device)
    with torch.no_grad():
        for start in range(0, len(order), batch_size * world):
            mine = process_slots(order[start:start + batch_size * world], 1, world, rank)[0]
            weight = 1.0 if len(mine) else 0.0
            ids, mask, decoder_ids, labels = collate(rows, mine if len(mine) else order[start:start + 1],
                                                     pad_id, start_id, accelerator.device, pad_multiple)
            with accelerator.autocast():
                nll += weight * sequence_nll_sum(model, ids, mask, decoder_ids, labels, head,
                                                 head_rows_multiple(pad_multiple))
    if world > 1:
        nll = accelerator.reduce(nll, reduction="sum")
    return float(nll) / int(rows.target_lengths.sum())


def weights_for_engine(accelerator, model, config, lora_scaling: float | None):
    """A plain T5ForConditionalGeneration holding the current weights, on the main process (None
    elsewhere). A collective call under FSDP / DeepSpeed: every process must make it."""
    from accelerate.utils import DistributedType

    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if lora_scaling is None and not sharded:
        return accelerator.unwrap_model(model) if accelerator.is_main_process else None
    state = accelerator.get_state_dict(model) if sharded else accelerator.unwrap_model(model).state_dict()
    if not accelerator.is_main_process:
        return None
    return t5_from_state_dict(config, plain_cpu_state_dict(state, lora_scaling))


def plain_cpu_state_dict(state: dict, lora_scaling: float | None) -> dict:
    """CPU copies of a (PEFT) T5 state dict under plain T5 names, LoRA adapters merged:
    W = W_base + scaling * B @ A, in fp32. Tensors shared in `state` (tied embeddings) stay shared."""
    import torch

    copies: dict[tuple, torch.Tensor] = {}

    def cpu(tensor):
        key = (tensor.device, tensor.data_ptr(), tensor.shape)
        if key not in copies:
            copies[key] = tensor.detach().to("cpu", dtype=torch.float32, copy=True)
        return copies[key]

    plain = {}
    for key, tensor in state.items():
        name = key.removeprefix(_PEFT_PREFIX)
        if ".lora_" in name:
            continue
        plain[name.replace(".base_layer.", ".")] = cpu(tensor)
    for key, tensor in state.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix(_PEFT_PREFIX).split(".lora_A.")[0]
        b = state[key.replace(".lora_A.", ".lora_B.")]
        delta = b.detach().to("cpu", torch.float32) @ tensor.detach().to("cpu", torch.float32)
        merged = plain[module + ".weight"] + lora_scaling * delta
        plain[module + ".weight"] = merged  # a new tensor: the base copy may be shared
    return plain


def t5_from_state_dict(config, state: dict):
    """A T5ForConditionalGeneration on CPU holding `state` (no random init: built on the meta
    device, then the tensors are assigned)."""
    import torch
    from transformers import T5ForConditionalGeneration

    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"weights missing from the training state: {missing[:5]}")
    return model.eval()


def engine_device(accelerator, hf_model, dtype_bytes: int) -> str:
    """The training device when it has room for the engine's copy of the weights, else CPU."""
    import torch

    device = accelerator.device
    if device.type != "cuda":
        return str(device)
    need = sum(p.numel() for p in hf_model.parameters()) * dtype_bytes * ENGINE_DEVICE_HEADROOM
    free, _ = torch.cuda.mem_get_info(device)
    if free >= need:
        return str(device)
    log.warning("validation ranks on CPU: %s has %.1f GiB free, the engine needs %.1f GiB",
                device, free / 2**30, need / 2**30)
    return "cpu"


def seqrec_validation(hf_model, tokenizer, instances: list[SeqRecInstance], device: str, precision: str,
                      max_source_tokens: int = 512) -> dict:
    """HR@1/3/5 and NDCG@3/5 of `instances` ranked by the engine on the in-memory weights, per
    template (`by_template`). The record's own metrics are those of the template with the best
    NDCG@5 (ties: the first id), named under `template`: the choice `instructrec eval` makes on
    validation, so the figure the run prints is the one an evaluation of these weights would use."""
    from instructrec.engine import Reranker, Request

    from .metrics import rank_in_result, summarize_ranks

    reranker = Reranker.from_model(hf_model, tokenizer, device=device,
                                   dtype="bfloat16" if precision == "bf16" else "float32",
                                   max_source_tokens=max_source_tokens)
    requests = [Request(instruction=x.instruction, candidates=x.candidates, candidate_ids=x.candidate_ids,
                        request_id=str(i)) for i, x in enumerate(instances)]
    results = reranker.rank(requests, errors="return")
    ranks: dict[str, list[int]] = {}
    errors: dict[str, int] = {}
    for instance, result in zip(instances, results, strict=True):
        mine = ranks.setdefault(instance.template, [])
        errors.setdefault(instance.template, 0)
        if result.error is not None:
            errors[instance.template] += 1
            if sum(errors.values()) <= 3:
                log.warning("validation instance %s (%s) failed in the engine: %s", result.request_id,
                            instance.template, result.error)
            mine.append(len(instance.candidates) + 1)  # a failure counts as a miss
            continue
        mine.append(rank_in_result(result.ranked_ids, result.scores, instance.positive_id))
    by_template = {t: dict(summarize_ranks(ranks[t]), errors=errors[t]) for t in sorted(ranks)}
    best = max(by_template, key=lambda t: by_template[t]["ndcg@5"])  # max keeps the first of a tie
    return dict(by_template[best], template=best, by_template=by_template)
