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

`--device cuda` (or cuda:N) runs every provider on that GPU, or skips it with the reason
(providers.unavailable_reason; the report lists every provider not run and why). On a GPU each
workload also records torch's peak allocation (torch.cuda.max_memory_allocated, for the providers
whose memory torch allocates) and this process's peak as nvidia-smi reports it (bench/gpu_memory.py),
and utilisation is read against the GPU's measured bf16 tensor-core peak (bench/peaks.py). The
parent process never initialises CUDA: exports validated on the GPU, the peak and every provider
run in subprocesses. A provider whose subprocess fails is reported as failed with its error, and
the others still run.
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
from .providers import (
    ENGINE_FP32, PROVIDERS, REFERENCE, ProviderSpec, open_provider, prepare, unavailable_reason, versions,
)
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
    device: str = "cpu"  # cpu | cuda | cuda:N


def resolve_bench_device(device: str) -> str:
    """`--device` checked ("cpu", "cuda", "cuda:N"; CUDA present, N in range), as "cpu" or
    "cuda:N" ("cuda" is torch's current device, 0 unless set). Checks without creating a CUDA
    context."""
    from instructrec.engine.loading import resolve_device

    try:
        dev = resolve_device(device)
    except InputError as e:  # the same problem, under the flag's name
        raise InputError("--device", e.problem, "use --device cpu, or cuda / cuda:N where torch sees that CUDA "
                         "device (a CUDA build of torch: see make gpu-check)") from e
    if dev.type == "cpu":
        if dev.index not in (None, 0):
            raise InputError("--device", f"{device!r}: a CPU has no index", "use --device cpu")
        return "cpu"
    return f"cuda:{0 if dev.index is None else dev.index}"


def split_by_device(names: list[str], device: str) -> tuple[list[str], dict[str, str]]:
    """(providers that run on `device`, {provider: why it does not}), each reason logged."""
    runnable, skipped = [], {}
    for name in names:
        reason = unavailable_reason(PROVIDERS[name], device)
        if reason is None:
            runnable.append(name)
        else:
            skipped[name] = reason
            log.warning("provider %s skipped on %s: %s", name, device, reason)
    return runnable, skipped


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
                             job["pairs_per_batch"], job.get("device", "cpu"))
    provider.sync()
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
        with _gpu_memory(provider) as gpu_memory:
            run = provider.run(inputs)
        peak = _peak_rss_mib() if measure_memory else None
        needed = model_flops(shape, model_work(inputs, provider.tokenizer, job["seed"]))
        out[workload] = {
            "requests": inputs.n_requests, "candidates": inputs.n_candidates, "rankings": run.rankings,
            "scores": run.scores, "wall_s": run.wall_s, "tokenize_s": run.tokenize_s,
            "latencies_s": run.latencies_s, "model_flops": needed.as_dict(),
            "executed_flops": run.executed.as_dict(), "extra": run.extra, "peak_rss_mib": peak,
            "warmup_s": warmup_s, **gpu_memory.figures,
        }
        log.info("%s / %s: %.1f candidates/s", spec.name, workload,
                 inputs.n_candidates / max(1e-9, run.wall_s - run.tokenize_s))
    return {"provider": spec.name, "load_s": load_s, "workloads": out, "peak_kernel": provider.peak_kernel,
            "dtype": provider.dtype, "device": str(provider.device)}


class _gpu_memory:
    """Peak GPU memory of one workload on a GPU provider: `figures` gets peak_gpu_torch_mib
    (torch.cuda.max_memory_allocated: for the providers whose memory torch allocates, the torch
    engine and Hugging Face), peak_gpu_process_mib (nvidia-smi, the whole process) and
    gpu_memory_note (what is left out and why). Nothing on CPU."""

    def __init__(self, provider) -> None:
        self.provider = provider
        self.figures: dict = {}
        self.sampler = None

    def __enter__(self) -> "_gpu_memory":
        if self.provider.on_gpu:
            import torch

            from .gpu_memory import ProcessGpuMemorySampler

            self.provider.sync()
            torch.cuda.reset_peak_memory_stats(self.provider.device)
            self.sampler = ProcessGpuMemorySampler().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sampler is None:
            return
        import torch

        self.sampler.__exit__(*exc)
        spec = self.provider.spec
        torch_owned = spec.name.startswith("engine-torch") or spec.family == "hf"
        notes = [] if self.sampler.note is None else [f"process figure: {self.sampler.note}"]
        if not torch_owned:
            notes.append("no torch figure: onnxruntime's arena and CTranslate2's allocator are outside torch's")
        allocated = torch.cuda.max_memory_allocated(self.provider.device) / 2 ** 20
        self.figures = {"peak_gpu_torch_mib": allocated if torch_owned else None,
                        "peak_gpu_process_mib": self.sampler.peak_mib, "gpu_memory_note": "; ".join(notes) or None}


class SubprocessFailed(RuntimeError):
    """A benchmark subprocess exited with an error; `reason` is its error line (or exit code)."""

    def __init__(self, args: list[str], reason: str):
        super().__init__(f"benchmark subprocess {' '.join(args)} failed: {reason}")
        self.reason = reason


def _spawn(args: list[str], threads: int, result: Path) -> tuple[dict, float]:
    """Run `python -m instructrec.bench.harness ARGS`, return (its JSON result, peak RSS MiB).
    Raises SubprocessFailed with the subprocess's own error line when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    result.unlink(missing_ok=True)  # a result left by an earlier run must not pass for this one's
    proc = subprocess.Popen([sys.executable, "-m", "instructrec.bench.harness", *args, "--result", str(result)],
                            env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        error = None
        if result.exists():
            try:
                error = json.loads(result.read_text()).get("error")
            except ValueError:
                error = None
        raise SubprocessFailed(args, error or f"exited with {code} (see its log above)")
    return json.loads(result.read_text()), usage.ru_maxrss / 1024  # Linux: KiB


def _measure_peaks(model: str, checkpoint: Path, kernels: set[str], cfg: BenchConfig, work: Path,
                   ct2_dirs: dict[str, str]) -> dict[str, dict]:
    """Peak entry of each kernel family in `kernels` (bench/peaks.py): measured where this CPU runs
    its dtype natively (on a GPU: the GPU's bf16 tensor-core peak), at cfg.threads, in one
    subprocess of its own (nothing else of ours is loaded beside it); otherwise an entry with the
    reason and no figure."""
    from instructrec.engine.capabilities import cpu_info

    measure, peaks = plan_peaks(kernels, cpu_info())
    if not measure:
        return peaks
    config = checkpoint / "config.json"
    job = {"kernels": measure, "config": str(config), "threads": cfg.threads, "seconds": cfg.peak_seconds,
           "ct2_dirs": ct2_dirs, "device": cfg.device}
    if cfg.in_process:
        result = _peaks_job(job)
    else:
        job_file = work / f"peaks-job-{_file_name(model)}.json"
        job_file.write_text(json.dumps(job))
        try:
            result, _ = _spawn(["--peaks", str(job_file)], cfg.threads, work / f"peaks-{_file_name(model)}.json")
        except SubprocessFailed as e:
            log.error("%s: the peak measurement failed (%s): no utilisation figures", model, e.reason)
            result = {k: {"kernel": k, "flops_per_s": None, "note": f"n/a (peak measurement failed: {e.reason})",
                          "how": ""} for k in measure}
    return {**peaks, **result}


def _peaks_job(job: dict) -> dict:
    shape = T5Shape.from_config(json.loads(Path(job["config"]).read_text()))
    return {k: measure_peak(k, shape, job["threads"], job["seconds"], job["ct2_dirs"], job.get("device", "cpu"))
            for k in job["kernels"]}


def _prepare_job(job: dict) -> dict:
    """A provider's preparation in a subprocess of its own (exports validated on the GPU)."""
    path = prepare(PROVIDERS[job["provider"]], Path(job["checkpoint"]), Path(job["cache"]), job["device"])
    return {"path": str(path)}


def _prepare(name: str, model: str, checkpoint: Path, cache: Path, cfg: BenchConfig, work: Path) -> Path:
    """prepare() in this process, or in a subprocess where it would touch the GPU (a bf16 export
    is validated there): the parent never holds a CUDA context while the workers measure."""
    spec = PROVIDERS[name]
    if cfg.in_process or not cfg.device.startswith("cuda") or spec.name != "engine-onnx-bf16":
        return prepare(spec, checkpoint, cache, cfg.device)
    job_file = work / f"prepare-job-{_file_name(model)}-{name}.json"
    job_file.write_text(json.dumps({"provider": name, "checkpoint": str(checkpoint), "cache": str(cache),
                                    "device": cfg.device}))
    result, _ = _spawn(["--prepare", str(job_file)], cfg.threads, work / f"prepare-{_file_name(model)}-{name}.json")
    return Path(result["path"])


def _file_name(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "--", model).strip("-")


# ---- parent --------------------------------------------------------------------------------------


def run_bench(cfg: BenchConfig, model_dirs: dict[str, Path] | None = None) -> dict:
    """Run the benchmark and write results.{csv,md,png,json} into cfg.out. `model_dirs`: label ->
    checkpoint folder, used instead of resolving cfg.models (tests pass a tiny T5). Providers that
    cannot run on cfg.device, or whose run fails, are listed in summary["not_run"] with the reason.
    The outputs are written after each model (a run stopped later keeps the models it finished)."""
    cfg.device = resolve_bench_device(cfg.device)  # first: a wrong device costs no other work
    check_names("--workloads", cfg.workloads, WORKLOADS)
    if model_dirs is not None:
        check_names("--models", cfg.models, tuple(model_dirs))
        sources = {}
    else:  # every spec resolved (or refused) before any work
        if not cfg.models:
            raise InputError("--models", "is empty", "name at least one model, e.g. random:flan-t5-base")
        sources = {model: resolve_bench_model(model) for model in cfg.models}
    default = cfg.providers is None
    cfg.providers, skipped = split_by_device(resolve_providers(cfg.providers), cfg.device)
    if default:  # the report also names the peers left out for a missing package
        skipped.update({name: f"package {spec.missing_package()} is not installed (pip install -e '.[bench]')"
                        for name, spec in PROVIDERS.items() if spec.missing_package()})
    not_run: dict[str, dict] = {name: {"status": "skipped", "reason": reason} for name, reason in skipped.items()}
    for name, value in (("--requests", cfg.requests), ("--peer-requests", cfg.peer_requests),
                        ("--threads", cfg.threads), ("--pairs-per-batch", cfg.pairs_per_batch)):
        if value < 1:
            raise InputError(name, f"must be at least 1, got {value}")
    if not cfg.providers:
        raise InputError("--providers", f"no provider can run on {cfg.device}: "
                         + "; ".join(f"{n}: {r}" for n, r in skipped.items()),
                         "install what the reasons name, or choose another --device")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_at_start = os.getloadavg()
    cfg.out.mkdir(parents=True, exist_ok=True)
    work = cfg.out / "raw"
    work.mkdir(exist_ok=True)
    records: list[dict] = []
    peaks: dict[str, dict[str, dict]] = {}
    gpu: dict | None = None
    for model in cfg.models:
        if model_dirs is not None:
            checkpoint, cache = Path(model_dirs[model]), cfg.cache / _file_name(model)
        else:
            cache = cfg.cache / cache_key(sources[model], cfg.seed)
            checkpoint = model_checkpoint(sources[model], cfg.cache, cfg.seed)
        config = json.loads((checkpoint / "config.json").read_text())
        architecture = architecture_of(config)
        runs: dict[str, dict] = {}
        paths: dict[str, Path] = {}
        for name in cfg.providers:
            spec = PROVIDERS[name]
            try:
                paths[name] = _prepare(name, model, checkpoint, cache, cfg, work)
            except SubprocessFailed as e:
                log.error("%s on %s: preparation failed: %s", name, model, e.reason)
                _failed(not_run, name, f"{model}: preparation failed: {e.reason}")
                continue
            job = {"provider": name, "path": str(paths[name]), "checkpoint": str(checkpoint),
                   "threads": cfg.threads, "seed": cfg.seed, "warmup": cfg.warmup, "device": cfg.device,
                   "pairs_per_batch": cfg.pairs_per_batch, "measure_memory": not cfg.in_process,
                   "workloads": {w: requests_for(w, spec, cfg) for w in cfg.workloads}}
            log.info("%s on %s (%s): %s", name, model, cfg.device, job["workloads"])
            if cfg.in_process:
                result, process_peak = run_worker(job), None
            else:
                job_file = work / f"job-{_file_name(model)}-{name}.json"
                job_file.write_text(json.dumps(job))
                try:
                    result, process_peak = _spawn(["--worker", str(job_file)], cfg.threads,
                                                  work / f"result-{_file_name(model)}-{name}.json")
                except SubprocessFailed as e:
                    log.error("%s on %s failed: %s", name, model, e.reason)
                    _failed(not_run, name, f"{model}: {e.reason}")
                    continue
            for workload in result["workloads"].values():
                workload["process_peak_rss_mib"] = process_peak
            # raw rankings and scores, kept for inspection beside the figures
            (work / f"result-{_file_name(model)}-{name}.json").write_text(json.dumps(result))
            runs[name] = result
        ct2_dirs = {PROVIDERS[n].dtype: str(paths[n]) for n in runs if PROVIDERS[n].family == "ct2"}
        peaks[model] = _measure_peaks(model, checkpoint, {r["peak_kernel"] for r in runs.values()}, cfg, work,
                                      ct2_dirs)
        gpu = gpu or next((e["gpu"] for e in peaks[model].values() if e.get("gpu")), None)
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
                                "architecture": architecture, "device": cfg.device, "dtype": dtype,
                                "versions": versions(spec, cfg.device), "peak_kernel": result["peak_kernel"],
                                "utilisation_note": note, "gpu_memory_note": run.get("gpu_memory_note"),
                                "figures": values})
        if REFERENCE not in runs:
            log.warning("%s was not run: no agreement figures vs Hugging Face for %s", REFERENCE, model)
        # after every model, so that a run stopped later (a time limit on the GPU check) keeps the
        # models it finished
        summary = _write_outputs(cfg, records, peaks, not_run, gpu, sources, model_dirs is not None, started,
                                 load_at_start, done=cfg.models[: cfg.models.index(model) + 1])
    return summary


def _write_outputs(cfg: BenchConfig, records: list[dict], peaks: dict, not_run: dict, gpu: dict | None,
                   sources: dict, test_models: bool, started: str, load_at_start: tuple, done: list[str]) -> dict:
    """results.{csv,md,png,json} of the models benchmarked so far; returns the summary."""
    from instructrec.engine.capabilities import cpu_info

    rows = [{"provider": r["provider"], "workload": r["workload"], "model": r["model"], "device": r["device"],
             "dtype": r["dtype"], "figure": figure, "value": value, "versions": r["versions"], "time": started}
            for r in records for figure, value in r["figures"].items()]
    write_csv(cfg.out / "results.csv", rows)
    cpu = cpu_info()
    random_note = ("random weights (fair for speed, never for quality)"
                   if test_models or any(s.is_random for s in sources.values()) else "trained weights")
    where = f"CPU: {cpu.summary()}"
    if cfg.device.startswith("cuda"):
        where = f"GPU {cfg.device}: {_gpu_summary(gpu)}; host {where}"
    pending = [m for m in cfg.models if m not in done]
    header = (f"{started}: `{command_line(cfg)}`, {cfg.threads} thread(s), {where}; load average "
              f"{load_at_start[0]:.2f} / {load_at_start[1]:.2f} / {load_at_start[2]:.2f} (1 / 5 / 15 min) at the start; "
              f"{random_note}" + (f"; still to run: {', '.join(pending)}" if pending else ""))
    (cfg.out / "results.md").write_text(markdown(records, peaks, header, not_run, cfg.device))
    chart(cfg.out / "results.png", records)
    summary = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
               "time": started, "device": cfg.device, "gpu": gpu, "models_done": done,
               "cpu": {"model": cpu.model, "summary": cpu.summary(), "features": cpu.features(),
                       "native_bf16": cpu.native_bf16, "native_int8": cpu.native_int8},
               "load_average_at_start": list(load_at_start),
               "models": {m: s.identity() for m, s in sources.items()}, "peaks": peaks, "records": records,
               "not_run": not_run}
    (cfg.out / "results.json").write_text(json.dumps(summary, indent=1))
    log.info("wrote %s (%s done)", ", ".join(str(cfg.out / f) for f in ("results.csv", "results.md", "results.png",
                                                                         "results.json")), ", ".join(done))
    return summary


def _failed(not_run: dict[str, dict], name: str, reason: str) -> None:
    """Record a provider's failure (on one model; another model's failure adds its reason)."""
    entry = not_run.setdefault(name, {"status": "failed", "reason": ""})
    entry["reason"] = f"{entry['reason']}; {reason}" if entry["reason"] else reason


def _gpu_summary(gpu: dict | None) -> str:
    if not gpu:
        return "(no GPU facts: the peak measurement did not run)"
    return (f"{gpu['name']}, compute capability {gpu['capability']}, {gpu['memory_gib']:.0f} GiB, "
            f"CUDA {gpu['cuda']} (torch's build)")


def command_line(cfg: BenchConfig) -> str:
    return (f"instructrec bench --workloads {','.join(cfg.workloads)} --providers {','.join(cfg.providers)} "
            f"--models {','.join(cfg.models)} --requests {cfg.requests} --peer-requests {cfg.peer_requests} "
            f"--threads {cfg.threads} --seed {cfg.seed} --device {cfg.device}")


def _worker_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description="internal: one benchmark subprocess")
    p.add_argument("--worker", type=Path, help="a provider's job file")
    p.add_argument("--peaks", type=Path, help="a peak-measurement job file (bench/peaks.py)")
    p.add_argument("--prepare", type=Path, help="a preparation job file (an export validated on the GPU)")
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.worker:
            result = run_worker(json.loads(args.worker.read_text()))
        elif args.prepare:
            result = _prepare_job(json.loads(args.prepare.read_text()))
        else:
            result = _peaks_job(json.loads(args.peaks.read_text()))
    except Exception as e:  # noqa: BLE001 -- any failure: one line to the parent's report, the traceback to the log
        log.exception("benchmark subprocess failed")
        error = " | ".join(line.strip() for line in f"{type(e).__name__}: {e}".splitlines() if line.strip())
        args.result.write_text(json.dumps({"error": error[:1500]}))
        return 3
    args.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1:]))
