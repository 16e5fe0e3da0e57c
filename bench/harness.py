"""`instructrec bench`: every provider on every workload and model, each provider in its own
subprocess, then figures, agreement with the hf-batched fp32 reference and with the fp32 engine,
and the reports.

Flow per model: resolve it (`random:<shape>`, a Hub id or a folder; engine/sources.py), build the
random-weight checkpoint of a random shape (cached), prepare each provider (our ONNX export,
Optimum's export, CTranslate2 conversions; cached), run one worker subprocess per provider on its
workloads, then measure, in one more subprocess at the same thread count, the peak of each kernel
family the providers ran on (bench/peaks.py: only dtypes this CPU runs natively). A worker sets the thread count (torch, onnxruntime intra-op, CTranslate2
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

from .flops import T5Shape, model_flops
from .peaks import measure_peak, plan_peaks
from .providers import ENGINE_FP32, PROVIDERS, REFERENCE, ProviderSpec, open_provider, prepare, versions
from .report import chart, figures, markdown, write_csv
from .workloads import (
    GROUP_SIZE, WORKLOADS, architecture_of, cache_key, check_names, model_checkpoint, model_work,
    resolve_bench_model, workload_inputs,
)

log = logging.getLogger(__name__)

DEFAULT_MODELS = ("random:flan-t5-small", "random:flan-t5-base")
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
    return with_engine_reference(names)


def with_engine_reference(names: list[str]) -> list[str]:
    """`names`, with engine-torch-fp32 added where another engine precision runs without it:
    every engine dtype's rankings are compared with the fp32 engine's on all its requests."""
    others = [n for n in names if PROVIDERS[n].family == "engine" and n != ENGINE_FP32]
    if others and ENGINE_FP32 not in names:
        log.info("adding %s: the agreement reference of %s", ENGINE_FP32, ", ".join(others))
        return [ENGINE_FP32, *names]
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
    return {"provider": spec.name, "load_s": load_s, "workloads": out, "peak_kernel": provider.peak_kernel,
            "dtype": provider.dtype}


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


def _measure_peaks(model: str, checkpoint: Path, kernels: set[str], cfg: BenchConfig, work: Path,
                   ct2_dirs: dict[str, str]) -> dict[str, dict]:
    """Peak entry of each kernel family in `kernels` (bench/peaks.py): measured where this CPU runs
    its dtype natively, at cfg.threads, in one subprocess of its own (nothing else of ours is
    loaded beside it); otherwise an entry with the reason and no figure."""
    from instructrec.engine.capabilities import cpu_info

    measure, peaks = plan_peaks(kernels, cpu_info())
    if not measure:
        return peaks
    config = checkpoint / "config.json"
    job = {"kernels": measure, "config": str(config), "threads": cfg.threads, "seconds": cfg.peak_seconds,
           "ct2_dirs": ct2_dirs}
    if cfg.in_process:
        result = _peaks_job(job)
    else:
        job_file = work / f"peaks-job-{_file_name(model)}.json"
        job_file.write_text(json.dumps(job))
        result, _ = _spawn(["--peaks", str(job_file)], cfg.threads, work / f"peaks-{_file_name(model)}.json")
    return {**peaks, **result}


def _peaks_job(job: dict) -> dict:
    shape = T5Shape.from_config(json.loads(Path(job["config"]).read_text()))
    return {k: measure_peak(k, shape, job["threads"], job["seconds"], job["ct2_dirs"]) for k in job["kernels"]}


def _file_name(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "--", model).strip("-")


# ---- parent --------------------------------------------------------------------------------------


def run_bench(cfg: BenchConfig, model_dirs: dict[str, Path] | None = None) -> dict:
    """Run the benchmark and write results.{csv,md,png,json} into cfg.out. `model_dirs`: label ->
    checkpoint folder, used instead of resolving cfg.models (tests pass a tiny T5)."""
    from instructrec.engine.capabilities import cpu_info

    check_names("--workloads", cfg.workloads, WORKLOADS)
    if model_dirs is not None:
        check_names("--models", cfg.models, tuple(model_dirs))
        sources = {}
    else:  # every spec resolved (or refused) before any work
        sources = {model: resolve_bench_model(model) for model in cfg.models}
    cfg.providers = resolve_providers(cfg.providers)
    for name, value in (("--requests", cfg.requests), ("--peer-requests", cfg.peer_requests),
                        ("--threads", cfg.threads), ("--pairs-per-batch", cfg.pairs_per_batch)):
        if value < 1:
            raise InputError(name, f"must be at least 1, got {value}")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_at_start = os.getloadavg()
    cfg.out.mkdir(parents=True, exist_ok=True)
    work = cfg.out / "raw"
    work.mkdir(exist_ok=True)
    records: list[dict] = []
    peaks: dict[str, dict[str, dict]] = {}
    for model in cfg.models:
        if model_dirs is not None:
            checkpoint, cache = Path(model_dirs[model]), cfg.cache / _file_name(model)
        else:
            cache = cfg.cache / cache_key(sources[model], cfg.seed)
            checkpoint = model_checkpoint(sources[model], cfg.cache, cfg.seed)
        config = json.loads((checkpoint / "config.json").read_text())
        architecture = architecture_of(config)
        paths = {name: prepare(PROVIDERS[name], checkpoint, cache) for name in cfg.providers}
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
                job_file = work / f"job-{_file_name(model)}-{name}.json"
                job_file.write_text(json.dumps(job))
                result, process_peak = _spawn(["--worker", str(job_file)], cfg.threads,
                                              work / f"result-{_file_name(model)}-{name}.json")
            for workload in result["workloads"].values():
                workload["process_peak_rss_mib"] = process_peak
            # raw rankings and scores, kept for inspection beside the figures
            (work / f"result-{_file_name(model)}-{name}.json").write_text(json.dumps(result))
            runs[name] = result
        ct2_dirs = {PROVIDERS[n].dtype: str(paths[n]) for n in cfg.providers if PROVIDERS[n].family == "ct2"}
        peaks[model] = _measure_peaks(model, checkpoint, {r["peak_kernel"] for r in runs.values()}, cfg, work,
                                      ct2_dirs)
        log.info("%s: peaks %s", model, {k: f"{v['flops_per_s'] / 1e9:.0f} GFLOP/s" if v["flops_per_s"] else v["note"]
                                          for k, v in peaks[model].items()})
        for name, result in runs.items():
            spec = PROVIDERS[name]
            for workload, run in result["workloads"].items():
                reference = runs.get(REFERENCE, {}).get("workloads", {}).get(workload)
                engine_fp32 = runs.get(ENGINE_FP32, {}).get("workloads", {}).get(workload)
                values, note = figures(run, peaks[model].get(result["peak_kernel"]), reference, engine_fp32,
                                       provider=name)
                dtype = result["dtype"] if spec.dtype != "auto" else f"{result['dtype']} (auto)"
                records.append({"provider": name, "workload": workload, "model": model,
                                "architecture": architecture, "device": "cpu", "dtype": dtype,
                                "versions": versions(spec), "peak_kernel": result["peak_kernel"],
                                "utilisation_note": note, "figures": values})
        if REFERENCE not in runs:
            log.warning("%s was not run: no agreement figures vs Hugging Face for %s", REFERENCE, model)
    rows = [{"provider": r["provider"], "workload": r["workload"], "model": r["model"], "device": r["device"],
             "dtype": r["dtype"], "figure": figure, "value": value, "versions": r["versions"], "time": started}
            for r in records for figure, value in r["figures"].items()]
    write_csv(cfg.out / "results.csv", rows)
    cpu = cpu_info()
    random_note = ("random weights (fair for speed, never for quality)"
                   if model_dirs is not None or any(s.is_random for s in sources.values()) else "trained weights")
    header = (f"{started}: `{command_line(cfg)}`, {cfg.threads} thread(s), CPU: {cpu.summary()}; load average "
              f"{load_at_start[0]:.2f} / {load_at_start[1]:.2f} / {load_at_start[2]:.2f} (1 / 5 / 15 min) at the start; "
              f"{random_note}")
    (cfg.out / "results.md").write_text(markdown(records, peaks, header))
    chart(cfg.out / "results.png", records)
    summary = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
               "time": started, "cpu": {"model": cpu.model, "summary": cpu.summary(), "features": cpu.features(),
                                        "native_bf16": cpu.native_bf16, "native_int8": cpu.native_int8},
               "load_average_at_start": list(load_at_start),
               "models": {m: s.identity() for m, s in sources.items()}, "peaks": peaks, "records": records}
    (cfg.out / "results.json").write_text(json.dumps(summary, indent=1))
    log.info("wrote %s", ", ".join(str(cfg.out / f) for f in ("results.csv", "results.md", "results.png",
                                                               "results.json")))
    return summary


def command_line(cfg: BenchConfig) -> str:
    return (f"instructrec bench --workloads {','.join(cfg.workloads)} --providers {','.join(cfg.providers)} "
            f"--models {','.join(cfg.models)} --requests {cfg.requests} --peer-requests {cfg.peer_requests} "
            f"--threads {cfg.threads} --seed {cfg.seed}")


def _worker_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description="internal: one benchmark subprocess")
    p.add_argument("--worker", type=Path, help="a provider's job file")
    p.add_argument("--peaks", type=Path, help="a peak-measurement job file (bench/peaks.py)")
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.worker:
        result = run_worker(json.loads(args.worker.read_text()))
    else:
        result = _peaks_job(json.loads(args.peaks.read_text()))
    args.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1:]))
