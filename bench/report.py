"""Benchmark outputs: figures per (provider, workload, model), results.csv, results.md, results.png.

results.csv has exactly the columns (provider, workload, model, device, dtype, figure, value,
versions, time), one row per figure.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable

import numpy as np

from .agreement import ranking_agreement
from .peaks import utilisation

CSV_COLUMNS = ("provider", "workload", "model", "device", "dtype", "figure", "value", "versions", "time")
# The bar of the engine's CPU speed: rerank-10 on the flan-t5-base architecture, dtype="auto" at
# least 5x CTranslate2's fastest configuration with top-1 agreement >= 0.99 against fp32; the goal
# beyond it, >= 50% of the measured peak of the precision used. Hugging Face batched: 8x, kept
# from the first bar.
BAR_ARCHITECTURE, BAR_WORKLOAD, BAR_PROVIDER = "flan-t5-base", "rerank-10", "engine-torch-auto"
BAR_TOP1 = 0.99
BAR_VS_CT2, BAR_VS_HF, GOAL_UTILISATION = 5.0, 8.0, 0.50
# The GPU targets (issue 16), read on a --device cuda run: rerank-10 on the flan-t5-xl
# architecture in bf16, >= 50% model-FLOP utilisation of the measured bf16 tensor-core peak,
# >= 5x Hugging Face batched (bf16) and >= 3x Optimum's ORTModelForSeq2SeqLM on onnxruntime's CUDA
# provider in candidates/s, top-1 agreement >= 0.99 with the fp32 engine. For scale, a published
# pointwise query-likelihood reranker with Flan-T5-XL (the prompt re-encoded per document) ran
# about 71 documents/s on an RTX A6000.
GPU_ARCHITECTURE, GPU_WORKLOAD = "flan-t5-xl", "rerank-10"
GPU_MFU, GPU_VS_HF, GPU_VS_OPTIMUM, GPU_TOP1 = 0.50, 5.0, 3.0, 0.99
PUBLISHED_A6000_DOCS_PER_S = 71


def figures(run: dict, peak: dict | None, reference: dict | None, engine_fp32: dict | None = None,
            provider: str = "") -> tuple[dict[str, float], str | None]:
    """(figures, utilisation note) of one provider on one workload. `run`: the worker's record;
    `peak`: the peak entry of the kernels it ran on (bench/peaks.py), or None; `reference`: the
    hf-batched record of the same workload and model, or None; `engine_fp32`: engine-torch-fp32's
    record (agreement on its larger request set, figures suffixed _vs_engine_fp32), or None. The
    note says why there is no utilisation figure (None when there is one)."""
    model_s = run["wall_s"] - run["tokenize_s"]
    out: dict[str, float] = {
        "requests": run["requests"], "candidates": run["candidates"],
        "candidates_per_s": run["candidates"] / model_s, "requests_per_s": run["requests"] / model_s,
        "wall_s": run["wall_s"], "tokenize_s": run["tokenize_s"], "model_s": model_s,
        "model_gflop": run["model_flops"]["total"] / 1e9, "executed_gflop": run["executed_flops"]["total"] / 1e9,
        "encoder_passes": run["extra"]["encoder_passes"],
    }
    if run.get("warmup_s") is not None:  # older records lack it
        out["warmup_s"] = run["warmup_s"]
    if run["latencies_s"]:
        lat = np.asarray(run["latencies_s"]) * 1e3
        out["latency_p50_ms"] = float(np.percentile(lat, 50))
        out["latency_p95_ms"] = float(np.percentile(lat, 95))
    if run.get("peak_rss_mib") is not None:
        out["peak_rss_mib"] = run["peak_rss_mib"]
    for key in ("peak_gpu_torch_mib", "peak_gpu_process_mib"):  # GPU runs (bench/harness.py _gpu_memory)
        if run.get(key) is not None:
            out[key] = run[key]
    if run.get("process_peak_rss_mib") is not None:
        out["process_peak_rss_mib"] = run["process_peak_rss_mib"]
    used, note = utilisation(run["model_flops"]["total"], run["executed_flops"]["total"], model_s, peak, provider)
    out.update(used)
    if reference is not None:
        agreement = ranking_agreement(run["rankings"], reference["rankings"])
        out["top1_agreement"] = agreement["top1_agreement"]
        out["kendall_tau"] = agreement["kendall_tau"]
        out["agreement_requests"] = agreement["requests"]
        if run["scores"] is not None and reference["scores"] is not None:
            n = agreement["requests"]
            diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                       for a, b in zip(run["scores"][:n], reference["scores"][:n]))
            out["max_abs_score_diff"] = diff
    if engine_fp32 is not None and engine_fp32 is not run:
        agreement = ranking_agreement(run["rankings"], engine_fp32["rankings"])
        out["top1_agreement_vs_engine_fp32"] = agreement["top1_agreement"]
        out["kendall_tau_vs_engine_fp32"] = agreement["kendall_tau"]
        out["agreement_requests_vs_engine_fp32"] = agreement["requests"]
    return out, note


def write_csv(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in CSV_COLUMNS})


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _top1_vs_fp32(f: dict) -> tuple[float | None, str]:
    """Top-1 agreement against fp32 and what it was measured against: the fp32 engine's larger
    request set where there is one, else hf-batched."""
    if "top1_agreement_vs_engine_fp32" in f:
        return f["top1_agreement_vs_engine_fp32"], \
            f"vs engine-torch-fp32 on {int(f['agreement_requests_vs_engine_fp32'])} requests"
    if "top1_agreement" in f:
        return f["top1_agreement"], f"vs hf-batched fp32 on {int(f['agreement_requests'])} requests"
    return None, "no fp32 reference in this run"


def bar_status(records: list[dict]) -> list[str]:
    """Lines on the bar (see BAR_*): rerank-10 on the flan-t5-base architecture."""
    group = {r["provider"]: r for r in records
             if r["workload"] == BAR_WORKLOAD and r.get("architecture") == BAR_ARCHITECTURE}
    if not group:
        return [f"The bar ({BAR_WORKLOAD} on the {BAR_ARCHITECTURE} architecture) was not part of this run."]
    lines = []
    if BAR_PROVIDER in group:
        best = BAR_PROVIDER
    else:
        engines = {p: r for p, r in group.items() if p.startswith("engine-")
                   and (_top1_vs_fp32(r["figures"])[0] or 0) >= BAR_TOP1}
        if not engines:
            return [f"Neither {BAR_PROVIDER} nor an engine provider with top-1 agreement >= {BAR_TOP1:.0%} "
                    "against fp32 ran."]
        best = max(engines, key=lambda p: engines[p]["figures"]["candidates_per_s"])
        lines.append(f"{BAR_PROVIDER} was not run: the bar is read on the fastest engine provider with top-1 "
                     f">= {BAR_TOP1:.0%}.")
    record = group[best]
    f = record["figures"]
    top1, against = _top1_vs_fp32(f)
    top1_ok = top1 is not None and top1 >= BAR_TOP1
    lines.append(f"{best} ({record['dtype']}): {_fmt(f['candidates_per_s'])} candidates/s, top-1 agreement "
                 + (f"{top1:.3f} {against}" if top1 is not None else against)
                 + f" (bar {BAR_TOP1:.2f}): {'met' if top1_ok else 'NOT met'}.")
    ct2 = {p: r["figures"]["candidates_per_s"] for p, r in group.items() if p.startswith("ct2-")}
    if ct2:
        fastest = max(ct2, key=ct2.get)
        ratio = f["candidates_per_s"] / ct2[fastest]
        lines.append(f"vs {fastest} (CTranslate2's fastest in this run): {ratio:.2f}x (bar {BAR_VS_CT2:g}x): "
                     f"{'met' if ratio >= BAR_VS_CT2 and top1_ok else 'NOT met'}.")
    else:
        lines.append("No CTranslate2 provider ran: the 5x part of the bar is not measured.")
    if "hf-batched" in group:
        ratio = f["candidates_per_s"] / group["hf-batched"]["figures"]["candidates_per_s"]
        lines.append(f"vs hf-batched: {ratio:.2f}x (bar {BAR_VS_HF:g}x): {'met' if ratio >= BAR_VS_HF else 'NOT met'}.")
    if "utilisation_model" in f:
        lines.append(f"utilisation (model FLOPs / the {record['peak_kernel']} peak): {f['utilisation_model']:.1%} "
                     f"(goal {GOAL_UTILISATION:.0%}): {'met' if f['utilisation_model'] >= GOAL_UTILISATION else 'not yet'}.")
    else:
        lines.append(f"utilisation against the {record['peak_kernel']} peak: {record.get('utilisation_note')}.")
    return lines


def _pct(f: dict, key: str, note: str | None) -> str:
    if key in f:
        return f"{f[key]:.1%}"  # <= 100% by construction (bench/peaks.py utilisation)
    return note or ""


def peak_lines(peaks: dict[str, dict[str, dict]]) -> list[str]:
    """One line per (model, kernel family): the measured peak and how, or why there is none."""
    lines = []
    for model, entries in peaks.items():
        lines.append(f"Peaks measured in this run, {model}, GEMMs shaped like the model's:")
        for kernel, e in sorted(entries.items()):
            if e.get("flops_per_s"):
                extra = f"; {e['ct2_backend']}" if e.get("ct2_backend") else ""
                if e.get("gpu"):
                    extra += f"; {e['gpu']['name']}"
                lines.append(f"- {kernel}: {e['flops_per_s'] / 1e9:,.1f} GFLOP/s ({e['how']}{extra})")
            else:
                lines.append(f"- {kernel}: {e['note']}")
    return lines


def not_run_lines(not_run: dict[str, dict] | None) -> list[str]:
    """One line per provider that did not run: skipped (cannot run on this device or machine) or
    failed (its subprocess raised), with the reason."""
    if not not_run:
        return []
    return ["### Providers not run", ""] + [f"- {name}: {e['status']}: {e['reason']}"
                                            for name, e in sorted(not_run.items())] + [""]


def markdown(records: list[dict], peaks: dict[str, dict[str, dict]], header: str,
             not_run: dict[str, dict] | None = None, device: str = "cpu") -> str:
    gpu = device.startswith("cuda")
    lines = [header, ""] + peak_lines(peaks) + [""]
    if gpu:
        lines += ["On the GPU every utilisation is model-FLOP utilisation against the measured bf16 tensor-core "
                  "peak above, whatever precision the provider computes in. Peak GPU memory: torch = "
                  "torch.cuda.max_memory_allocated (the torch engine and Hugging Face only); process = this "
                  "provider's process as nvidia-smi reports it, sampled every 0.1 s (CUDA context and the "
                  "libraries' cached pools included; a shorter peak can be missed).", ""]
    keys = sorted({(r["workload"], r["model"]) for r in records}, key=lambda k: (k[1], k[0]))
    gpu_head, gpu_rule = ("| GPU MiB torch | GPU MiB process ", "---:|---:|") if gpu else ("", "")
    for workload, model in keys:
        group = [r for r in records if r["workload"] == workload and r["model"] == model]
        ref = next((r["figures"]["candidates_per_s"] for r in group if r["provider"] == "hf-batched"), None)
        ct2 = [r["figures"]["candidates_per_s"] for r in group if r["provider"].startswith("ct2-")]
        lines += [f"### {workload}, {model}", "",
                  "| provider | dtype | requests | candidates/s | x hf-batched | x CT2 fastest | requests/s | p50 ms "
                  f"| p95 ms | peak RSS MiB {gpu_head}| tokenize s | peak of | util (model) | util (executed) "
                  "| top-1 vs HF | tau vs HF | top-1 vs engine fp32 | tau vs engine fp32 |",
                  f"|---|---|---:|---:|---:|---:|---:|---:|---:|---:|{gpu_rule}---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(group, key=lambda r: -r["figures"]["candidates_per_s"]):
            f = r["figures"]
            note = r.get("utilisation_note")
            speedup = f"{f['candidates_per_s'] / ref:.2f}" if ref else ""
            vs_ct2 = f"{f['candidates_per_s'] / max(ct2):.2f}" if ct2 else ""
            gpu_cells = (f"| {_fmt(f.get('peak_gpu_torch_mib'))} | {_fmt(f.get('peak_gpu_process_mib'))} "
                         if gpu else "")
            lines.append(
                f"| {r['provider']} | {r['dtype']} | {int(f['requests'])} | {_fmt(f['candidates_per_s'])} | {speedup} "
                f"| {vs_ct2} | {_fmt(f['requests_per_s'])} | {_fmt(f.get('latency_p50_ms'))} "
                f"| {_fmt(f.get('latency_p95_ms'))} | {_fmt(f.get('peak_rss_mib'))} {gpu_cells}"
                f"| {_fmt(f['tokenize_s'])} "
                f"| {r.get('peak_kernel') or ''} | {_pct(f, 'utilisation_model', note)} "
                f"| {_pct(f, 'utilisation_executed', note)} | {_fmt(f.get('top1_agreement'))} "
                f"| {_fmt(f.get('kendall_tau'))} | {_fmt(f.get('top1_agreement_vs_engine_fp32'))} "
                f"| {_fmt(f.get('kendall_tau_vs_engine_fp32'))} |")
        notes = sorted({f"{r['provider']}: {r['gpu_memory_note']}" for r in group if r.get("gpu_memory_note")})
        lines += [""] + ([f"GPU memory notes: {'; '.join(notes)}", ""] if notes else [])
    lines += not_run_lines(not_run)
    if gpu:
        lines += ["### The GPU targets", ""] + [f"- {line}" for line in gpu_target_status(records)] + [""]
    else:
        lines += ["### The bar", ""] + [f"- {line}" for line in bar_status(records)] + [""]
    return "\n".join(lines)


def gpu_target_status(records: list[dict]) -> list[str]:
    """Lines on the GPU targets (see GPU_*): rerank-10 on the flan-t5-xl architecture, read on the
    fastest engine provider computing in bf16 (engine-torch-bf16 first when it ran)."""
    group = {r["provider"]: r for r in records
             if r["workload"] == GPU_WORKLOAD and r.get("architecture") == GPU_ARCHITECTURE}
    if not group:
        return [f"The GPU targets ({GPU_WORKLOAD} on the {GPU_ARCHITECTURE} architecture, bf16) were not part of "
                "this run."]
    engines = {p: r for p, r in group.items() if p.startswith("engine-") and r["dtype"].startswith("bfloat16")}
    if not engines:
        return ["No engine provider ran in bf16 on this GPU: the targets are not measured."]
    best = max(engines, key=lambda p: engines[p]["figures"]["candidates_per_s"])
    record = engines[best]
    f = record["figures"]
    lines = [f"Read on {best} ({record['dtype']}), the fastest engine provider in bf16: "
             f"{_fmt(f['candidates_per_s'])} candidates/s."]
    if "utilisation_model" in f:
        mfu = f["utilisation_model"]
        lines.append(f"model-FLOP utilisation {mfu:.1%} of the measured bf16 tensor-core peak "
                     f"(target {GPU_MFU:.0%}): {'met' if mfu >= GPU_MFU else 'NOT met'}.")
    else:
        lines.append(f"model-FLOP utilisation: {record.get('utilisation_note') or 'not measured'} "
                     f"(target {GPU_MFU:.0%}).")
    for peer, target, what in (("hf-batched-bf16", GPU_VS_HF, "Hugging Face batched, bf16"),
                               ("optimum-ort", GPU_VS_OPTIMUM, "Optimum ORTModelForSeq2SeqLM, onnxruntime CUDA")):
        if peer in group:
            ratio = f["candidates_per_s"] / group[peer]["figures"]["candidates_per_s"]
            verdict = "met" if ratio >= target else "NOT met"
            lines.append(f"vs {peer} ({what}): {ratio:.2f}x (target {target:g}x): {verdict}.")
        else:
            lines.append(f"{peer} ({what}) did not run: the {target:g}x target is not measured.")
    top1 = f.get("top1_agreement_vs_engine_fp32")
    if top1 is None:
        lines.append("engine-torch-fp32 did not run: top-1 agreement with fp32 is not measured.")
    else:
        requests = int(f["agreement_requests_vs_engine_fp32"])
        lines.append(f"top-1 agreement with engine-torch-fp32 {top1:.3f} on {requests} requests "
                     f"(target {GPU_TOP1:.2f}): {'met' if top1 >= GPU_TOP1 else 'NOT met'}.")
    lines.append(f"For scale: {_fmt(f['candidates_per_s'])} candidates/s here; a published pointwise Flan-T5-XL "
                 f"reranker re-encoding the prompt per document ran about {PUBLISHED_A6000_DOCS_PER_S} documents/s on "
                 "an RTX A6000 (another GPU: context, not a target).")
    return lines


def chart(path: Path, records: list[dict]) -> None:
    """Candidates/s per provider, one group of bars per (workload, model), log scale."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    keys = sorted({(r["workload"], r["model"]) for r in records}, key=lambda k: (k[1], k[0]))
    providers = list(dict.fromkeys(r["provider"] for r in records))
    width = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(keys)) + 2.5, 4.5))
    for p, provider in enumerate(providers):
        values = []
        for workload, model in keys:
            match = [r["figures"]["candidates_per_s"] for r in records
                     if (r["provider"], r["workload"], r["model"]) == (provider, workload, model)]
            values.append(match[0] if match else np.nan)
        ax.bar(np.arange(len(keys)) + p * width - 0.4 + width / 2, values, width, label=provider)
    ax.set_xticks(np.arange(len(keys)), [f"{w}\n{m}" for w, m in keys])
    ax.set_yscale("log")
    ax.set_ylabel("candidates/s (log)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
