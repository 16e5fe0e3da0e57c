"""`instructrec bench`: every provider on every workload and model, each provider in its own
subprocess, then figures, agreement with the hf-batched fp32 reference, and the reports.

Flow per model: build the random-weight checkpoint (cached), prepare each provider (our ONNX
export, Optimum's export, CTranslate2 conversions; cached), measure the matmul peak of each dtype
in use (a subprocess each, same thread count), then one worker subprocess per provider runs its
workloads. A worker sets the thread count (torch, onnxruntime intra-op, CTranslate2
intra_threads), runs a warm-up on other seeded requests, then times each workload; it resets the
kernel's peak-RSS mark (/proc/self/clear_refs) before each workload, and the parent reads the
whole process's peak through wait4 (ru_maxrss).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from instructrec.engine.errors import InputError

from .flops import T5Shape, matmul_peak, model_flops
from .providers import ENGINE_FP32, PROVIDERS, REFERENCE, ProviderSpec, open_provider, prepare, versions
from .report import CSV_COLUMNS, chart, figures, markdown, write_csv
from .workloads import GROUP_SIZE, MODEL_SHAPES, WORKLOADS, build_checkpoint, check_names, model_work, workload_inputs

log = logging.getLogger(__name__)

DEFAULT_MODELS = ("flan-t5-small", "flan-t5-base")
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "instructrec-bench-cache"


@dataclass
class BenchConfig:
    workloads: list[str]
    providers: list[str]
    models: list[str]
    requests: int = 64
    peer_requests: int = 6
    threads: int = 2
    seed: int = 0
    warmup: int = 2
    pairs_per_batch: int = 40
    out: Path = Path("bench-results")
    cache: Path = DEFAULT_CACHE
    peak_seconds: float = 0.4  # timing per GEMM shape of the matmul peak
    in_process: bool = False  # tests only: no process isolation, so no memory figures


def requests_for(workload: str, spec: ProviderSpec, cfg: BenchConfig) -> int:
    """Requests a provider scores on a workload: --requests, or --peer-requests for the peers that
    run the encoder per pair. rerank-100 and pointwise take a tenth (a request is 10 to 12
    encodings there), latency half. Every provider scores the first N of the same seeded list,
    so agreement uses the shared prefix."""
    base = min(cfg.requests, cfg.peer_requests) if spec.repeats_encoder else cfg.requests
    share = {"rerank-100": 10, "pointwise": 10, "latency": 2}.get(workload, 1)
    return max(1, math.ceil(base / share))


def resolve_providers(names: list[str] | None) -> list[str]:
    """Explicit names must all be runnable; the default is every provider whose package is
    installed, each missing one named in a warning."""
    if names is None:
        chosen = []
        for name, spec in PROVIDERS.items():
            missing = spec.missing_package()
            if missing:
                log.warning("provider %s skipped: package %s is not installed (pip install %s)", name, missing,
                            "ctranslate2" if missing == "ctranslate2" else "optimum-onnx")
            else:
                chosen.append(name)
        return chosen
    check_names("--providers", names, tuple(PROVIDERS))
    for name in names:
        missing = PROVIDERS[name].missing_package()
        if missing:
            raise InputError("--providers", f"{name} needs the package {missing}, which is not installed",
                             "pip install -e '.[bench]', or leave that provider out")
    return names


# ---- worker --------------------------------------------------------------------------------------


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS (VmHWM), Linux >= 4.0
        return True
    except OSError as e:
        log.warning("cannot reset the peak-RSS mark (%s): per-workload peak memory is left out", e)
        return False


def _peak_rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)\s+kB", status).group(1)) / 1024


def run_worker(job: dict) -> dict:
    """One provider on its workloads (in the worker subprocess). Returns the JSON-able record."""
    import torch

    torch.set_num_threads(job["threads"])
    spec = PROVIDERS[job["provider"]]
    checkpoint = Path(job["checkpoint"])
    t0 = time.perf_counter()
    provider = open_provider(spec, Path(job["path"]), checkpoint, job["threads"], job["seed"],
                             job["pairs_per_batch"])
    load_s = time.perf_counter() - t0
    shape = T5Shape.from_config(json.loads((checkpoint / "config.json").read_text()))
    out = {}
    for workload, n_requests in job["workloads"].items():
        inputs = workload_inputs(workload, n_requests, job["seed"], provider.tokenizer)
        # Other seeded requests; a 20-candidate tournament (two groups and a final) warms every
        # path of rerank-100 at a fifth of its cost.
        warm = workload_inputs(workload, 1 if workload == "rerank-100" else job["warmup"], job["seed"] + 1,
                               provider.tokenizer, tournament_candidates=2 * GROUP_SIZE)
        log.info("%s / %s: warm-up, then %d requests", spec.name, workload, n_requests)
        warm_started = time.perf_counter()
        provider.run(warm)  # includes torch.compile's compilation for the compiled provider
        warmup_s = time.perf_counter() - warm_started
        measure_memory = job["measure_memory"] and _reset_peak_rss()
        run = provider.run(inputs)
        peak = _peak_rss_mib() if measure_memory else None
        needed = model_flops(shape, model_work(inputs, provider.tokenizer, job["seed"]))
        out[workload] = {
            "requests": inputs.n_requests, "candidates": inputs.n_candidates, "rankings": run.rankings,
            "scores": run.scores, "wall_s": run.wall_s, "tokenize_s": run.tokenize_s,
            "latencies_s": run.latencies_s, "model_flops": needed.as_dict(),
            "executed_flops": run.executed.as_dict(), "extra": run.extra, "peak_rss_mib": peak,
            "warmup_s": warmup_s,
        }
        log.info("%s / %s: %.1f candidates/s", spec.name, workload,
                 inputs.n_candidates / max(1e-9, run.wall_s - run.tokenize_s))
    return {"provider": spec.name, "load_s": load_s, "workloads": out}


def _spawn(args: list[str], threads: int, result: Path) -> tuple[dict, float]:
    """Run `python -m instructrec.bench.harness ARGS`, return (its JSON result, peak RSS MiB)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.Popen([sys.executable, "-m", "instructrec.bench.harness", *args, "--result", str(result)],
                            env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark subprocess {' '.join(args)} exited with {proc.returncode}")
    return json.loads(result.read_text()), usage.ru_maxrss / 1024  # Linux: KiB


def _measure_peaks(model: str, checkpoint: Path, dtypes: list[str], cfg: BenchConfig, work: Path) -> dict:
    """Matmul peak FLOP/s of each dtype with GEMMs shaped like the checkpoint's model, at
    cfg.threads, in one subprocess of its own (nothing else of ours is loaded beside it)."""
    config = checkpoint / "config.json"
    if cfg.in_process:
        shape = T5Shape.from_config(json.loads(config.read_text()))
        return {d: matmul_peak(shape, d, cfg.threads, seconds=cfg.peak_seconds)["flops_per_s"] for d in dtypes}
    result, _ = _spawn(["--peak", str(config), "--dtypes", ",".join(dtypes), "--threads", str(cfg.threads),
                        "--seconds", str(cfg.peak_seconds)], cfg.threads, work / f"peaks-{model}.json")
    return {d: r["flops_per_s"] for d, r in result.items()}


# ---- parent --------------------------------------------------------------------------------------


def run_bench(cfg: BenchConfig, model_dirs: dict[str, Path] | None = None) -> dict:
    """Run the benchmark and write results.{csv,md,png,json} into cfg.out. `model_dirs`: use
    these checkpoints instead of building the named shapes (tests pass a tiny T5)."""
    check_names("--workloads", cfg.workloads, WORKLOADS)
    check_names("--models", cfg.models, tuple(MODEL_SHAPES) if model_dirs is None else tuple(model_dirs))
    cfg.providers = resolve_providers(cfg.providers)
    for name, value in (("--requests", cfg.requests), ("--peer-requests", cfg.peer_requests),
                        ("--threads", cfg.threads), ("--pairs-per-batch", cfg.pairs_per_batch)):
        if value < 1:
            raise InputError(name, f"must be at least 1, got {value}")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    cfg.out.mkdir(parents=True, exist_ok=True)
    work = cfg.out / "raw"
    work.mkdir(exist_ok=True)
    records: list[dict] = []
    peaks: dict[str, dict[str, float]] = {}
    for model in cfg.models:
        cache = cfg.cache / model
        if model_dirs is not None:
            checkpoint = model_dirs[model]
        else:
            checkpoint = build_checkpoint(cache / "checkpoint", MODEL_SHAPES[model], cfg.seed)
        paths = {name: prepare(PROVIDERS[name], checkpoint, cache) for name in cfg.providers}
        dtypes = sorted({PROVIDERS[p].peak_dtype for p in cfg.providers} | {"bfloat16"})
        peaks[model] = _measure_peaks(model, checkpoint, dtypes, cfg, work)
        log.info("%s: matmul peak %s", model, {d: f"{v / 1e9:.0f} GFLOP/s" for d, v in peaks[model].items()})
        runs: dict[str, dict] = {}
        for name in cfg.providers:
            spec = PROVIDERS[name]
            job = {"provider": name, "path": str(paths[name]), "checkpoint": str(checkpoint),
                   "threads": cfg.threads, "seed": cfg.seed, "warmup": cfg.warmup,
                   "pairs_per_batch": cfg.pairs_per_batch, "measure_memory": not cfg.in_process,
                   "workloads": {w: requests_for(w, spec, cfg) for w in cfg.workloads}}
            log.info("%s on %s: %s", name, model, job["workloads"])
            if cfg.in_process:
                result, process_peak = run_worker(job), None
            else:
                job_file = work / f"job-{model}-{name}.json"
                job_file.write_text(json.dumps(job))
                result, process_peak = _spawn(["--worker", str(job_file)], cfg.threads,
                                              work / f"result-{model}-{name}.json")
            for workload in result["workloads"].values():
                workload["process_peak_rss_mib"] = process_peak
            # raw rankings and scores, kept for inspection beside the figures
            (work / f"result-{model}-{name}.json").write_text(json.dumps(result))
            runs[name] = result
        for name, result in runs.items():
            spec = PROVIDERS[name]
            for workload, run in result["workloads"].items():
                run["peak_dtype"] = spec.peak_dtype
                reference = runs.get(REFERENCE, {}).get("workloads", {}).get(workload)
                engine_fp32 = runs.get(ENGINE_FP32, {}).get("workloads", {}).get(workload)
                records.append({"provider": name, "workload": workload, "model": model, "device": "cpu",
                                "dtype": spec.dtype, "versions": versions(spec),
                                "figures": figures(run, peaks[model], reference, engine_fp32)})
        if REFERENCE not in runs:
            log.warning("%s was not run: no agreement figures for %s", REFERENCE, model)
    rows = [{"provider": r["provider"], "workload": r["workload"], "model": r["model"], "device": r["device"],
             "dtype": r["dtype"], "figure": figure, "value": value, "versions": r["versions"], "time": started}
            for r in records for figure, value in r["figures"].items()]
    write_csv(cfg.out / "results.csv", rows)
    header = (f"{started}: `{command_line(cfg)}`, {cfg.threads} thread(s), {_cpu_name()}, random weights "
              "(fair for speed, never for quality)")
    (cfg.out / "results.md").write_text(markdown(records, peaks, header))
    chart(cfg.out / "results.png", records)
    summary = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
               "time": started, "peaks": peaks, "records": records}
    (cfg.out / "results.json").write_text(json.dumps(summary, indent=1))
    log.info("wrote %s", ", ".join(str(cfg.out / f) for f in ("results.csv", "results.md", "results.png",
                                                               "results.json")))
    return summary


def _cpu_name() -> str:
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        return "unknown CPU"
    return f"{match.group(1).strip()} ({os.cpu_count()} cores)" if match else "unknown CPU"


def command_line(cfg: BenchConfig) -> str:
    return (f"instructrec bench --workloads {','.join(cfg.workloads)} --providers {','.join(cfg.providers)} "
            f"--models {','.join(cfg.models)} --requests {cfg.requests} --peer-requests {cfg.peer_requests} "
            f"--threads {cfg.threads} --seed {cfg.seed}")


def _worker_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description="internal: one benchmark subprocess")
    p.add_argument("--worker", type=Path)
    p.add_argument("--peak", type=Path, help="config.json whose shapes the GEMMs take")
    p.add_argument("--dtypes", help="comma-separated, for --peak")
    p.add_argument("--threads", type=int)
    p.add_argument("--seconds", type=float)
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.worker:
        result = run_worker(json.loads(args.worker.read_text()))
    else:
        shape = T5Shape.from_config(json.loads(args.peak.read_text()))
        result = {d: matmul_peak(shape, d, args.threads, seconds=args.seconds) for d in args.dtypes.split(",")}
    args.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1:]))
