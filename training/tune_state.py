"""What a training run leaves on disk: checkpoints, metrics.jsonl, loss_curve.png, the model card.

A checkpoint (`OUT/checkpoints/step-NNNNNN/`) is `accelerator.save_state` (weights, optimiser,
scheduler, each process's RNG; FSDP and DeepSpeed in their own layouts) plus `trainer_state.json`
(step, data position, settings) and, for full fine-tuning, config.json and the tokenizer, so the
folder is also a `save_pretrained` checkpoint the engine loads. Model weights are saved under
their plain names (no DDP `module.` prefix), so a checkpoint of N processes resumes with M.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np

from instructrec.engine.errors import InputError, ModelLoadError

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
STATE_VERSION = 2
_DDP_PREFIX = "module."


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (their trainer_state.json is written last), oldest first."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def portable_weights(accelerator) -> None:
    """Save and load model weights without the DDP wrapper's `module.` prefix (accelerate keeps it),
    so checkpoints move between world sizes; and save each tensor once under its first name. T5's
    encoder and decoder embeddings are its `shared` weight: safetensors cannot hold two names of
    one tensor, and accelerate drops the aliases itself but warns at every checkpoint ("Removed
    shared tensor ... check by verifying") about what is T5's design, not a fault. Loading ties
    them back as before (safetensors' load_model expects the same first name)."""
    def portable_state(models, weights, output_dir):
        for i, state in enumerate(weights):
            if all(k.startswith(_DDP_PREFIX) for k in state):
                state = {k[len(_DDP_PREFIX):]: v for k, v in state.items()}
            weights[i] = _without_aliases(state)

    def unwrap_models(models, input_dir):
        models[:] = [accelerator.unwrap_model(m) for m in models]

    accelerator.register_save_state_pre_hook(portable_state)
    accelerator.register_load_state_pre_hook(unwrap_models)


def _without_aliases(state: dict) -> dict:
    """`state` with each tensor under its first name only: a later name of the very same tensor
    (same memory, shape and strides, as T5's tied embeddings) is dropped. Other views of one
    storage are kept, for accelerate to handle as before."""
    import torch

    kept, first_name = {}, {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.numel() > 0:
            same = (value.device, value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
            if same in first_name:
                log.debug("checkpoint: %s is %s (tied), saved once", name, first_name[same])
                continue
            first_name[same] = name
        kept[name] = value
    return kept


def save_checkpoint(accelerator, out: Path, step: int, state: dict, config, tokenizer, keep: int) -> Path:
    """Write to a staging folder and rename it, so a crash never leaves a half checkpoint that
    --resume would pick up. Every process calls this (save_state is collective)."""
    root = out / "checkpoints"
    final = root / f"step-{step:06d}"
    staging = root / f".staging-step-{step:06d}"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if config is not None:  # full weights: the folder is a save_pretrained checkpoint too
            config.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(checkpoint: Path, curve_fields: dict) -> dict:
    """The checkpoint's trainer_state.json, refused if written by another version or with settings
    that change the loss curve."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"resume: cannot read {checkpoint / STATE_FILE}: {exc}") from exc
    if state.get("version") != STATE_VERSION:
        raise ModelLoadError(f"resume: {checkpoint / STATE_FILE} has version {state.get('version')}, "
                             f"this program writes {STATE_VERSION}")
    saved = state["curve_fields"]
    differ = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in curve_fields.items() if saved.get(k) != v]
    # A field recorded only when set (compact_vocab, prior_rows, rank_negatives, ...) is missing from
    # `curve_fields` when the resuming run leaves it off: that changes the curve as much as a new value.
    differ += [f"{k}: checkpoint {v!r}, now off" for k, v in saved.items() if k not in curve_fields]
    if differ:
        raise InputError("resume", "the run's settings differ from the checkpoint's: " + "; ".join(differ),
                         "resume with the original settings (processes, per-process batch and accumulation "
                         "may change if their product stays; eval/save/progress/stop flags may change)")
    return state


class MetricsLog:
    """metrics.jsonl, one record per step and per evaluation (main process only)."""

    def __init__(self, path: Path, keep_through_step: int | None):
        self.path = path
        if keep_through_step is None:
            path.write_text("")
        else:
            # Drop records written after the checkpoint we resume from: the resumed run writes
            # them again, so the file stays one curve.
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= keep_through_step] if path.exists() else []
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def plot_loss_curve(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    ranked = [r for r in evals if "hr@1" in r]
    fig, axes = plt.subplots(1, 2 if ranked else 1, figsize=(11 if ranked else 6, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, lw=0.6, alpha=0.5, label="train (per step)")
        window = max(1, len(losses) // 50)
        if window > 1:
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, lw=1.5, label=f"train ({window}-step mean)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["valid_loss"] for r in evals], "o-", label="valid")
    if ranked:
        ax2 = axes[0][1]
        templates = sorted({t for r in ranked for t in r.get("by_template", {})})
        for template in templates or [None]:
            points = [(r["step"], r["by_template"][template] if template else r) for r in ranked
                      if template is None or template in r.get("by_template", {})]
            for key in ("hr@1", "ndcg@5"):
                label = f"{key.upper()} {template}" if template else key.upper()
                ax2.plot([p[0] for p in points], [p[1][key] for p in points], "o-", label=label)
        ax2.set_xlabel("optimiser step")
        ax2.set_title("sequential recommendation (valid)")
        ax2.set_ylim(0, 1)
        ax2.legend()
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("token NLL")
    ax.set_title("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def write_model_card(out: Path, source, cfg, result) -> None:
    """OUT/README.md: where the weights started and how they were trained. A model that started
    from random weights says so first, in words no reader can miss."""
    lines = ["---", "library_name: transformers", "tags: [t5, instructrec, recommendation]", "---", "",
             f"# {out.name}", ""]
    if source.is_random:
        lines += [f"**The weights started from RANDOM initialisation** ({source.spec}: the architecture "
                  "only, no pretrained knowledge). Everything this model knows comes from the "
                  f"{result.steps_done} training steps below.", ""]
    else:
        lines += [f"Fine-tuned from `{source.describe()}`.", ""]
    final = result.evaluations[-1] if result.evaluations else {}
    lines += ["Instruction-tuned by `instructrec train` with the sequence-to-sequence NLL of each "
              "instruction's target.", "",
              f"- data: `{cfg.instructions}`",
              f"- steps: {result.steps_done} of {result.total_steps}, global batch {result.global_batch_size} rows "
              f"({result.world_size} process(es)), {result.precision}",
              f"- optimiser: {cfg.optimizer}, peak lr {cfg.resolved_lr()}, {cfg.schedule} schedule, "
              f"{cfg.warmup_steps} warm-up steps",
              f"- LoRA: rank {cfg.lora_r} on {', '.join(cfg.lora_targets)} (merged)" if cfg.lora_r else "- all weights trained"]
    if final:
        lines.append(f"- final validation: loss {final['valid_loss']:.4f}"
                     + (f", HR@1 {final['hr@1']:.4f}, NDCG@5 {final['ndcg@5']:.4f}" if "hr@1" in final else ""))
    lines += ["", "Settings: `training_config.json`; curve: `metrics.jsonl`, `loss_curve.png`.", ""]
    (out / "README.md").write_text("\n".join(lines))
