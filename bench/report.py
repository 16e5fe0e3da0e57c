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

CSV_COLUMNS = ("provider", "workload", "model", "device", "dtype", "figure", "value", "versions", "time")
BAR_MODEL, BAR_WORKLOAD = "flan-t5-base", "rerank-10"
BAR_TOP1 = 0.99
BAR_VS_CT2, BAR_VS_HF, BAR_UTILISATION = 5.0, 8.0, 0.30


def figures(run: dict, peaks: dict[str, float], reference: dict | None,
            engine_fp32: dict | None = None) -> dict[str, float]:
    """Figures of one provider on one workload. `run`: the worker's record; `peaks`: matmul peak
    FLOP/s by dtype, measured in this run; `reference`: the hf-batched record of the same
    workload and model, or None; `engine_fp32`: engine-torch-fp32's record (agreement on its
    larger request set, figures suffixed _vs_engine_fp32), or None."""
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
    if run.get("process_peak_rss_mib") is not None:
        out["process_peak_rss_mib"] = run["process_peak_rss_mib"]
    peak = peaks.get(run["peak_dtype"])
    if peak:
        out["matmul_peak_gflops"] = peak / 1e9
        out["utilisation_model"] = run["model_flops"]["total"] / model_s / peak
        out["utilisation_executed"] = run["executed_flops"]["total"] / model_s / peak
    if peaks.get("bfloat16"):
        out["utilisation_model_vs_bf16_peak"] = run["model_flops"]["total"] / model_s / peaks["bfloat16"]
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
    return out


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


def bar_status(records: list[dict]) -> list[str]:
    """Lines on the bar: rerank-10, flan-t5-base, engine's best precision with top-1 >= 99%."""
    rows = {r["provider"]: r["figures"] for r in records
            if r["workload"] == BAR_WORKLOAD and r["model"] == BAR_MODEL}
    if not rows:
        return [f"The bar ({BAR_WORKLOAD}, {BAR_MODEL}) was not part of this run."]
    engines = {p: f for p, f in rows.items() if p.startswith("engine-") and f.get("top1_agreement", 0) >= BAR_TOP1}
    if not engines:
        return [f"No engine provider reached top-1 agreement >= {BAR_TOP1:.0%} with hf-batched fp32 "
                "(or hf-batched was not run)."]
    best = max(engines, key=lambda p: engines[p]["candidates_per_s"])
    f = engines[best]
    lines = [f"Engine's best qualifying provider: {best}, {_fmt(f['candidates_per_s'])} candidates/s, "
             f"top-1 {f['top1_agreement']:.3f} vs hf-batched fp32 on {int(f['agreement_requests'])} requests"
             + (f", {f['top1_agreement_vs_engine_fp32']:.3f} vs engine-torch-fp32 on "
                f"{int(f['agreement_requests_vs_engine_fp32'])}" if "top1_agreement_vs_engine_fp32" in f else "")
             + "."]
    ct2 = {p: g["candidates_per_s"] for p, g in rows.items() if p.startswith("ct2-")}
    if ct2:
        fastest = max(ct2, key=ct2.get)
        ratio = f["candidates_per_s"] / ct2[fastest]
        lines.append(f"vs {fastest} (CTranslate2's fastest): {ratio:.2f}x (bar {BAR_VS_CT2:g}x): "
                     f"{'met' if ratio >= BAR_VS_CT2 else 'NOT met'}.")
    if "hf-batched" in rows:
        ratio = f["candidates_per_s"] / rows["hf-batched"]["candidates_per_s"]
        lines.append(f"vs hf-batched: {ratio:.2f}x (bar {BAR_VS_HF:g}x): {'met' if ratio >= BAR_VS_HF else 'NOT met'}.")
    util = f.get("utilisation_model_vs_bf16_peak")
    if util is not None:
        lines.append(f"utilisation (model FLOPs / bf16 matmul peak): {util:.1%} (bar {BAR_UTILISATION:.0%}): "
                     f"{'met' if util >= BAR_UTILISATION else 'NOT met'}.")
    return lines


def markdown(records: list[dict], peaks: dict[str, dict[str, float]], header: str) -> str:
    lines = [header, ""]
    for model, by_dtype in peaks.items():
        measured = ", ".join(f"{d} {v / 1e9:,.0f} GFLOP/s" for d, v in by_dtype.items())
        lines.append(f"Matmul peak measured in this run, {model} GEMM shapes: {measured}.")
    lines.append("")
    keys = sorted({(r["workload"], r["model"]) for r in records}, key=lambda k: (k[1], k[0]))
    for workload, model in keys:
        group = [r for r in records if r["workload"] == workload and r["model"] == model]
        ref = next((r["figures"]["candidates_per_s"] for r in group if r["provider"] == "hf-batched"), None)
        lines += [f"### {workload}, {model}", "",
                  "| provider | dtype | requests | candidates/s | x hf-batched | requests/s | p50 ms | p95 ms "
                  "| peak RSS MiB | tokenize s | util (model) | util (executed) | util vs bf16 peak | top-1 | tau |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(group, key=lambda r: -r["figures"]["candidates_per_s"]):
            f = r["figures"]
            pct = lambda key: f"{f[key]:.1%}" if key in f else ""  # noqa: E731
            speedup = f"{f['candidates_per_s'] / ref:.2f}" if ref else ""
            lines.append(
                f"| {r['provider']} | {r['dtype']} | {int(f['requests'])} | {_fmt(f['candidates_per_s'])} | {speedup} "
                f"| {_fmt(f['requests_per_s'])} | {_fmt(f.get('latency_p50_ms'))} | {_fmt(f.get('latency_p95_ms'))} "
                f"| {_fmt(f.get('peak_rss_mib'))} | {_fmt(f['tokenize_s'])} | {pct('utilisation_model')} "
                f"| {pct('utilisation_executed')} | {pct('utilisation_model_vs_bf16_peak')} "
                f"| {_fmt(f.get('top1_agreement'))} | {_fmt(f.get('kendall_tau'))} |")
        lines.append("")
    lines += ["### The bar", ""] + [f"- {line}" for line in bar_status(records)] + [""]
    return "\n".join(lines)


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
