"""The report of `instructrec eval`: results_markdown (OUT/results.md) from the metrics, the model
and dataset facts recorded beside them, and merge_results, which adds one run's methods to an
earlier run's metrics (`--add-to`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instructrec.engine.errors import InstructRecError

from .eval_scenarios import BASELINE_METHODS, METRIC_KEYS, TUNED_METHODS
from .metrics import paired_hit_difference

if TYPE_CHECKING:
    from instructrec.engine.sources import ModelSource

    from .eval_domain import Domain


def dataset_stats(domain: Domain) -> dict:
    s = domain.stats
    return {"data": str(domain.data), "users": s["users"], "items": s["items"], "interactions": s["interactions"],
            "sparsity": s.get("sparsity"), "avg_seq_len": s.get("avg_seq_len"), "splits": s.get("splits"),
            "search_splits": s.get("search_splits")}


def model_info(source: ModelSource, tokenizer: Path | None = None) -> dict[str, Any]:
    """What was evaluated: the source's identity (what --model said, and exactly which weights: a
    Hub id's commit, a folder's path, a random shape), its architecture, and its training record
    where the folder has one."""
    info: dict[str, Any] = {"path": str(source.path) if source.path is not None else None,
                            "identity": source.identity()}
    if tokenizer is not None:
        info["tokenizer"] = str(tokenizer)
    if source.path is None:  # random:<shape>
        c = source.config()
        info["architecture"] = {k: c.get(k) for k in ("d_model", "d_ff", "num_layers", "num_decoder_layers",
                                                      "num_heads", "vocab_size")}
        return info
    model = source.path
    cfg_path = model / "training_config.json"
    if cfg_path.is_file():
        train_cfg = json.loads(cfg_path.read_text())
        info["training"] = {k: train_cfg.get(k) for k in (
            "model", "instructions", "optimizer", "lr", "batch_size", "max_steps", "max_minutes", "schedule",
            "warmup_steps", "resolved_precision", "threads", "max_source_length", "seed")}
    metrics_path = model / "metrics.jsonl"
    if metrics_path.is_file():
        records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        train = [r for r in records if r["kind"] == "train"]
        evals = [r for r in records if r["kind"] == "eval"]
        if train:
            info["steps"] = train[-1]["step"]
            info["examples_seen"] = train[-1]["examples_seen"]
            info["train_step_seconds"] = round(sum(r["examples"] / r["examples_per_s"] for r in train), 1)
            info["final_train_loss"] = train[-1]["loss"]
        if evals:
            info["final_eval"] = evals[-1]
    config_path = model / "config.json"
    if config_path.is_file():
        c = json.loads(config_path.read_text())
        info["architecture"] = {k: c.get(k) for k in ("d_model", "d_ff", "num_layers", "num_decoder_layers",
                                                      "num_heads", "vocab_size")}
    return info


def merge_results(previous: dict, new: dict) -> dict:
    """`previous` with the methods of `new` added per scenario (same instances: checked by count)."""
    merged = json.loads(json.dumps(previous))
    for name, entry in new["scenarios"].items():
        if name not in merged["scenarios"]:
            merged["scenarios"][name] = entry
            continue
        old = merged["scenarios"][name]
        if old["n_test"] != entry["n_test"] or old["candidates_per_list"] != entry["candidates_per_list"]:
            raise InstructRecError(f"scenario {name}: the run added to ranked {old['n_test']} lists of "
                                   f"{old['candidates_per_list']}, this one {entry['n_test']} of "
                                   f"{entry['candidates_per_list']}")
        old["methods"].update(entry["methods"])
        old["seconds"] = round(old.get("seconds", 0) + entry.get("seconds", 0), 1)
    merged["runs"] = previous.get("runs", [previous["config"]]) + [new["config"]]
    if new.get("model"):
        merged["model"] = new["model"]
    return merged


METHOD_LABELS = {"instructrec": "InstructRec (ours, tuned)", "zero-shot": "untuned (random init)",
                 "instructrec+popularity": "InstructRec + popularity prior (ours, hybrid)",
                 "popularity": "Popularity", "sasrec": "SASRec", "bert4rec": "BERT4Rec",
                 "two-tower": "two-tower (DSSM-style)", "tem": "TEM"}


def _score_label(m: dict) -> str:
    """The score form of a model method; the fused one also names its popularity weight."""
    form = m.get("normalize", "")
    return f"{form} + {m['popularity_weight']:g} x popularity" if "popularity_weight" in m else form


def _model_label(model: dict) -> str:
    identity = model.get("identity") or {}
    if identity.get("kind") == "random":
        return f"`{identity['spec']}` (RANDOM weights, seeded: the zero-shot reference only)"
    if identity.get("repo_id"):
        return f"`{identity['repo_id']}` at commit `{identity.get('commit')}` (`{model['path']}`)"
    return f"`{model['path']}`"


def results_markdown(results: dict) -> str:
    """Dataset statistics (the original's Table 5 columns), the model and baseline fits, and one
    table per scenario; the original's published HR@1 rows are marked as theirs, in italics."""
    lines = ["# Evaluation results", "", "## Datasets", "",
             "| dataset | #users | #items | #interactions | sparsity | avg. sequence |", "|---|---|---|---|---|---|"]
    for name, d in results.get("datasets", {}).items():
        sparsity = f"{100 * d['sparsity']:.3f}%" if d.get("sparsity") is not None else ""
        avg = f"{d['avg_seq_len']:.2f}" if d.get("avg_seq_len") is not None else ""
        lines.append(f"| {name}: `{d['data']}` | {d['users']:,} | {d['items']:,} | {d['interactions']:,} | "
                     f"{sparsity} | {avg} |")
    model = results.get("model") or {}
    if model:
        arch, training = model.get("architecture") or {}, model.get("training") or {}
        lines += ["", "## Model", "",
                  f"- {_model_label(model)}: T5 d_model {arch.get('d_model')}, d_ff {arch.get('d_ff')}, "
                  f"{arch.get('num_layers')}+{arch.get('num_decoder_layers')} layers, {arch.get('num_heads')} heads"]
        if training:
            lines.append(f"- trained from `{training.get('model')}` on `{training.get('instructions')}`: "
                         f"{model.get('steps')} steps x {training.get('batch_size')} rows "
                         f"({model.get('examples_seen')} examples), {training.get('optimizer')} lr {training.get('lr')}, "
                         f"{training.get('resolved_precision')}, {model.get('train_step_seconds')} s of steps")
        for member in model.get("ensemble") or []:
            lines.append(f"- its scores summed with {_model_label(member)}'s (each standardised per list; "
                         f"{member.get('steps')} steps)")
    fits = {}
    for entry in results["scenarios"].values():
        for method, m in entry["methods"].items():
            if "fit" in m:
                fits.setdefault((entry["domain"], method, m["fit"].get("config", {}).get("kind", "")), m["fit"])
    if fits:
        lines += ["", "## Baseline fits", "", "| domain | method | best epoch | valid metric | train s |", "|---|---|---|---|---|"]
        for (domain, method, kind), f in sorted(fits.items()):
            valid = f"{f['metric']} {f['best_valid']:.4f}" if f.get("best_valid") is not None else ""
            label = f"{method} ({kind})" if kind else method
            lines.append(f"| {domain} | {label} | {f['best_epoch']} | {valid} | {f['train_seconds']} |")
    for name, entry in results["scenarios"].items():
        lines += ["", f"## {name} {entry['notation']}: {entry['title']}", "",
                  f"{entry['n_test']} test instances of {entry['candidates_per_list']} candidates "
                  f"({entry['domain']} domain); templates: {', '.join(entry['templates'])}."
                  + (f" **{entry['dropped_training_targets']} more were dropped: their target is a training "
                     "target of the model** (train on `instructrec eval-train-set` to evaluate them all)."
                     if entry.get("dropped_training_targets") else ""), "",
                  "| method | HR@1 | HR@3 | HR@5 | NDCG@3 | NDCG@5 | template | score | errors |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method, m in entry["methods"].items():
            lines.append(f"| {METHOD_LABELS.get(method, method)} | " + " | ".join(f"{m[k]:.4f}" for k in METRIC_KEYS)
                         + f" | {m.get('template', '')} | {_score_label(m)} | {m.get('errors', '')} |")
        for method, value in entry.get("theirs", {}).items():
            label = "InstructRec (Flan-T5-XL 3B)" if method == "instructrec" else METHOD_LABELS.get(method, method)
            lines.append(f"| *theirs: {label}* | *{value:.4f}* | | | | | | | |")
        # Runs merged with --add-to may have chosen by different metrics; entries written before
        # the field existed name none.
        chosen_by: dict[str, list[str]] = {}
        for method, m in entry["methods"].items():
            if m.get("selected_by"):
                chosen_by.setdefault(m["selected_by"], []).append(METHOD_LABELS.get(method, method))
        if chosen_by:
            lines += ["", "Template, score form and popularity weight chosen "
                      + "; ".join(f"by validation {metric.upper()}: {', '.join(labels)}"
                                  for metric, labels in chosen_by.items()) + "."]
        for method, against in paired_differences(entry).items():
            lines += ["", f"Paired on the same {entry['n_test']} lists, HR@1 of {METHOD_LABELS.get(method, method)} "
                      "minus each baseline's, with its 95% interval: "
                      + ", ".join(f"{METHOD_LABELS.get(b, b)} {d:+.3f} +- {h:.3f}" for b, (d, h) in against.items())
                      + "."]
    return "\n".join(lines) + "\n"


def paired_differences(entry: dict) -> dict[str, dict[str, tuple[float, float]]]:
    """{tuned method: {baseline: (HR@1 difference, half-width of its 95% interval)}} over a
    scenario's test lists (metrics.paired_hit_difference), for the methods whose entries hold the
    rank of every list (runs before ranks were recorded have none: no pair for them)."""
    methods = entry["methods"]

    def ranks(method: str) -> list[int] | None:
        r = methods.get(method, {}).get("ranks")
        return r if r is not None and len(r) == entry["n_test"] >= 2 else None

    out: dict[str, dict[str, tuple[float, float]]] = {}
    for tuned in (m for m in TUNED_METHODS if ranks(m) is not None):
        against = {b: paired_hit_difference(ranks(tuned), ranks(b)) for b in BASELINE_METHODS if ranks(b) is not None}
        if against:
            out[tuned] = against
    return out
