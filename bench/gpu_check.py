"""`make gpu-check`: everything this project can check on a CUDA GPU, in one command, into gpu-report/.

    make gpu-check                                   # setup + every step, gpu-report/report.{md,json}
    python3 bench/gpu_check.py --dry-run             # the plan, on any machine (nothing runs)
    python3 bench/gpu_check.py --no-install --steps tests,kernel

Setup (skipped by --no-install): an environment whose torch sees the GPU, with this project and
its `gpu`, `dev` and `bench` extras, in --venv (default .venv-gpu):
- the launching python already has a CUDA torch (a GPU image, an offline machine): the venv
  reads that python's packages through a .pth file, so its torch, triton and CUDA libraries are
  used as they are; the extras are installed on top where the registry is reachable (offline,
  the project alone is installed and missing packages show up as skipped or failed steps);
- otherwise torch (the Makefile's TORCH_SPEC version) is installed from the PyTorch wheel index
  matching the driver's CUDA version (nvidia-smi), then the extras.
The gpu extra brings onnxruntime-gpu and never the CPU onnxruntime (both own the `onnxruntime`
module).

Steps, each in its own subprocess with a time limit inside --budget-s (default 480 s, the issue's
8 minutes on one H100-class GPU); a step that fails or times out is reported and the next runs:
1. tests   `pytest -m gpu`: kernels, engine and onnx on CUDA (tests/kernels/test_cuda_kernels.py,
           tests/engine/test_cuda.py); passed / failed / skipped and each failure.
2. kernel  the LM-head chunk sweep on CUDA (`python -m instructrec.bench.log_softmax_gather
           --device cuda --sweep`): evidence for kernels.CUDA_CHUNK_TOKENS.
3. engine  this engine on the GPU, random flan-t5-base and flan-t5-xl shapes in bf16: rerank-10,
           rerank-100 and latency (the bench's seeded workloads), candidates/s, p50/p95 latency,
           peak GPU memory, model-FLOP utilisation against the measured bf16 matmul peak, at the
           engine's default batch tokens and GPU-sized ones.
4. bench   `instructrec bench` on CUDA with every installed provider, if the bench has a --device
           flag; otherwise the step says what the bench cannot do yet.
5. train   `instructrec train --model random:flan-t5-xl` in bf16 with Adafactor and gradient
           checkpointing for a few steps: steps/s and peak GPU memory.
Peak GPU memory of every step is also sampled with nvidia-smi (whole device, CUDA context included).

Module level imports the standard library only: the setup runs under a bare python3, before
instructrec is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# In order of what only a GPU can show, so that a budget cut drops the least telling step (the
# kernel's chunk sweep) first.
STEPS = ("tests", "engine", "bench", "bench-xl", "train", "kernel")
DEFAULT_BUDGET_S = 480.0
# Each step's share of the budget (seconds); a step never runs past the budget's end either.
STEP_LIMIT_S = {"tests": 120.0, "engine": 90.0, "bench": 120.0, "bench-xl": 75.0, "train": 75.0, "kernel": 45.0}
SETUP_LIMIT_S = 900.0  # downloads (a CUDA torch is ~1 GB) are not part of the check's budget
EXTRAS = "gpu,dev,bench"
# PyTorch's CUDA wheel indexes, newest first: (the driver's CUDA version at least, index tag).
CUDA_WHEEL_INDEXES = (((13, 0), "cu130"), ((12, 8), "cu128"), ((12, 6), "cu126"))
ENGINE_MODELS = ("flan-t5-base", "flan-t5-xl")
ENGINE_WORKLOADS = ("rerank-10", "rerank-100", "latency")
# rerank-10 requests per model (rerank-100: a tenth, latency: a quarter): a few seconds each on one
# H100-class GPU. Batch tokens: the engine's default for the device (engine/runner.py's
# default_batch_tokens, 32,768 on CUDA), a quarter of it and four times it.
ENGINE_REQUESTS = {"flan-t5-base": 1024, "flan-t5-xl": 256}
ENGINE_BATCH_TOKEN_FACTORS = (0.25, 4)
TRAIN_STEPS = 12
# flan-t5-base: every GPU peer (its ONNX, Optimum and CTranslate2 conversions take about a minute).
# flan-t5-xl: the engine against Hugging Face only: converting 3B parameters for Optimum or
# CTranslate2 alone would take the whole budget on a fresh machine.
BENCH_BASE_PROVIDERS = ("engine-torch-bf16", "engine-torch-fp32", "engine-onnx-bf16", "hf-batched-bf16",
                        "optimum-ort", "ct2-int8-bf16")
BENCH_XL_PROVIDERS = ("engine-torch-bf16", "engine-torch-fp32", "hf-batched-bf16")


@dataclass
class Step:
    name: str
    status: str = "planned"  # planned | ok | failed | timeout | skipped
    command: list[str] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0
    peak_gpu_memory_mib: float | None = None  # nvidia-smi, whole device
    results: dict | list = field(default_factory=dict)
    log_tail: str = ""


# ---- machine facts (stdlib) -------------------------------------------------------------------


def nvidia_smi() -> dict | None:
    """GPUs and driver as nvidia-smi reports them, or None where there is no NVIDIA GPU."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        query = subprocess.run([exe, "--query-gpu=index,name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30, check=True).stdout
        header = subprocess.run([exe], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = []
    for line in query.strip().splitlines():
        index, name, memory, driver = [x.strip() for x in line.split(",")]
        gpus.append({"index": int(index), "name": name, "memory": memory, "driver": driver})
    if not gpus:
        return None
    cuda = re.search(r"CUDA Version:\s*([0-9]+)\.([0-9]+)", header)
    return {"gpus": gpus, "driver": gpus[0]["driver"],
            "driver_cuda": f"{cuda.group(1)}.{cuda.group(2)}" if cuda else None}


def cuda_wheel_index(driver_cuda: str | None) -> str | None:
    """The PyTorch wheel index for a driver supporting CUDA `driver_cuda` ("12.8"), or None."""
    if not driver_cuda:
        return None
    major, minor = (int(x) for x in driver_cuda.split("."))
    for (need_major, need_minor), tag in CUDA_WHEEL_INDEXES:
        if (major, minor) >= (need_major, need_minor):
            return f"https://download.pytorch.org/whl/{tag}"
    return None


def makefile_torch_version() -> str:
    """The torch version the Makefile pins (TORCH_SPEC ?= torch==X): one definition of it."""
    text = (REPO / "Makefile").read_text()
    found = re.search(r"^TORCH_SPEC \?= torch==([0-9][^\s]*)", text, re.M)
    if not found:
        raise RuntimeError("Makefile: no `TORCH_SPEC ?= torch==VERSION` line")
    return found.group(1)


class GpuMemorySampler:
    """Peak `memory.used` of each GPU (MiB) while a step runs, polled every `interval` seconds."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak = interval, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._exe = shutil.which("nvidia-smi")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run([self._exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                used = max(float(x) for x in out.split())
                self.peak = used if self.peak is None else max(self.peak, used)
            except (OSError, subprocess.SubprocessError, ValueError):
                pass  # a missed sample only lowers the resolution of the peak
            self._stop.wait(self.interval)

    def __enter__(self) -> "GpuMemorySampler":
        if self._exe:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._exe:
            self._thread.join(timeout=15)


def run_logged(cmd: list[str], timeout: float, log_path: Path, cwd: Path = REPO, env: dict | None = None) -> tuple[str, str]:
    """Run `cmd` with its output in `log_path`; (status ok | failed | timeout, last 3,000 characters)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            done = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, timeout=max(1.0, timeout),
                                  env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
            status = "ok" if done.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
    return status, log_path.read_text(errors="replace")[-3000:]


# ---- setup ------------------------------------------------------------------------------------


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _probe_torch(python: str) -> dict | None:
    code = ("import json, site, sys, torch; print(json.dumps({'torch': torch.__version__, "
            "'cuda': torch.cuda.is_available(), 'site': site.getsitepackages(), "
            "'version': '%d.%d' % sys.version_info[:2]}))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


WRITE_FILE = "write-file"  # a setup action that is no command: [WRITE_FILE, path, text]


def setup_commands(args, machine: dict | None) -> tuple[str, list[list[str]], str]:
    """(mode, the actions that build --venv, a note): 'reuse' the launching python's CUDA torch,
    or 'install' one from the wheel index matching the driver."""
    venv = (REPO / args.venv).resolve()
    py = str(venv_python(venv))
    parent = _probe_torch(args.python)
    if parent and parent["cuda"]:
        # A venv made from a venv does not see its parent's packages (--system-site-packages means
        # the base interpreter's); a .pth file puts them on sys.path after the venv's own.
        pth = venv / "lib" / f"python{parent['version']}" / "site-packages" / "_gpu_check_parent.pth"
        return "reuse", [
            [args.python, "-m", "venv", str(venv)],
            [WRITE_FILE, str(pth), "\n".join(parent["site"]) + "\n"],
            [py, "-m", "pip", "install", "--quiet", "--no-build-isolation", "-e", f"{REPO}[{EXTRAS}]"],
        ], f"reusing torch {parent['torch']} of {args.python}"
    index = cuda_wheel_index((machine or {}).get("driver_cuda"))
    if index is None:
        oldest = CUDA_WHEEL_INDEXES[-1][0]
        raise RuntimeError(f"no PyTorch CUDA wheel index for driver CUDA {(machine or {}).get('driver_cuda')} "
                           f"(needs >= {oldest[0]}.{oldest[1]}); install a CUDA torch yourself and rerun "
                           "with --python PATH")
    return "install", [
        [args.python, "-m", "venv", str(venv)],
        [py, "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        [py, "-m", "pip", "install", "--quiet", f"torch=={makefile_torch_version()}", "--index-url", index],
        # A venv that had the CPU onnxruntime: it goes before onnxruntime-gpu comes (same module).
        [py, "-m", "pip", "uninstall", "--quiet", "-y", "onnxruntime"],
        [py, "-m", "pip", "install", "--quiet", "-e", f"{REPO}[{EXTRAS}]"],
    ], f"torch {makefile_torch_version()} from {index}"


def run_setup(args, machine: dict, out: Path) -> tuple[Step, str | None]:
    step = Step("setup")
    t0 = time.perf_counter()
    try:
        mode, commands, note = setup_commands(args, machine)
    except RuntimeError as e:
        step.status, step.reason = "failed", str(e)
        return step, None
    step.results = {"mode": mode, "note": note}
    py = str(venv_python((REPO / args.venv).resolve()))
    for n, cmd in enumerate(commands):
        step.command = cmd
        if cmd[0] == WRITE_FILE:
            Path(cmd[1]).parent.mkdir(parents=True, exist_ok=True)
            Path(cmd[1]).write_text(cmd[2])
            continue
        if cmd[1:3] == ["-m", "venv"] and Path(py).exists():
            continue
        status, tail = run_logged(cmd, SETUP_LIMIT_S, out / "logs" / f"setup-{n}.log")
        if status != "ok" and mode == "reuse" and "install" in cmd:
            # Offline GPU images: the project alone, on the packages that are there.
            fallback = [py, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps", "-e", str(REPO)]
            status, tail = run_logged(fallback, SETUP_LIMIT_S, out / "logs" / f"setup-{n}-no-deps.log")
            if status == "ok":
                step.reason = ("the extras could not be installed (offline?): the project runs on the "
                               f"launching python's packages; see logs/setup-{n}.log")
        if status != "ok":
            step.status, step.log_tail = status, tail
            step.reason = f"`{' '.join(cmd)}` {status}"
            step.seconds = time.perf_counter() - t0
            return step, None
    step.status, step.seconds = "ok", time.perf_counter() - t0
    return step, py


def ensure_tokenizer(python: str, tok: Path | None, work: Path, out: Path) -> tuple[Path | None, str]:
    """A tokenizer folder for the engine and train steps: the Flan-T5 one where found, else the
    test suite's generated one (T5-style, ~3,300 pieces, token counts within ~0.9-1.2x of
    Flan-T5's on these texts; tests/conftest.py), made by the checking interpreter."""
    if tok is not None:
        return tok, f"Flan-T5 tokenizer at {tok}"
    target = work / "generated-tokenizer"
    code = ("import importlib.util, sys; from pathlib import Path; "
            f"spec = importlib.util.spec_from_file_location('suite_conftest', {str(REPO / 'tests' / 'conftest.py')!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            f"m._generated_tokenizer(Path({str(target)!r}))")
    status, _ = run_logged([python, "-c", code], 300, out / "logs" / "tokenizer.log")
    if status != "ok":
        return None, "no Flan-T5 tokenizer and the generated one failed: see logs/tokenizer.log"
    return target, "no Flan-T5 tokenizer found: the test suite's generated one (token counts ~0.9-1.2x Flan-T5's)"


# ---- steps ------------------------------------------------------------------------------------


def _environment(python: str) -> dict:
    """Versions and the CUDA device as the checking interpreter sees them."""
    code = r"""
import json, platform, sys
from importlib.metadata import PackageNotFoundError, version
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "versions": {}}
for name in ("instructrec", "triton", "onnxruntime", "onnxruntime-gpu", "transformers", "optimum-onnx",
             "ctranslate2", "numpy"):
    try:
        info["versions"][name] = version(name)
    except PackageNotFoundError:
        info["versions"][name] = None
try:
    import onnxruntime
    info["onnxruntime_providers"] = onnxruntime.get_available_providers()
except Exception as e:  # a broken or half-overwritten onnxruntime is itself a finding
    info["onnxruntime_providers"] = f"import failed: {e}"
if torch.cuda.is_available():
    info["devices"] = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        info["devices"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                "memory_gib": round(p.total_memory / 2**30, 1),
                                "multiprocessors": p.multi_processor_count,
                                "l2_cache_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1)})
print(json.dumps(info))
"""
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_junit(path: Path) -> dict:
    """Counts and the failing tests of a pytest --junitxml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skipped = [], {}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            for kind in ("failure", "error"):
                bad = case.find(kind)
                if bad is not None:
                    failed.append({"test": name, "kind": kind, "message": (bad.get("message") or "")[:300]})
            skip = case.find("skipped")
            if skip is not None:
                reason = skip.get("message") or ""
                skipped[reason] = skipped.get(reason, 0) + 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed, "skip_reasons": skipped}


def tokenizer_dir(args) -> Path | None:
    """A Flan-T5 tokenizer folder: --tokenizer, $INSTRUCTREC_SHARED, or shared/ beside or inside the repo."""
    candidates = [Path(args.tokenizer)] if args.tokenizer else []
    if os.environ.get("INSTRUCTREC_SHARED"):
        candidates.append(Path(os.environ["INSTRUCTREC_SHARED"]) / "assets" / "flan-t5-tokenizer")
    candidates += [REPO.parent / "shared" / "assets" / "flan-t5-tokenizer", REPO / "shared" / "assets" / "flan-t5-tokenizer"]
    for path in candidates:
        if (path / "tokenizer.json").exists() or (path / "spiece.model").exists():
            return path
    return None


def write_train_instructions(directory: Path, rows: int = 64) -> Path:
    """train/valid/test.parquet with the columns `instructrec train` reads, ~150-token
    instructions and short targets: enough for a timing run, not for learning anything."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    titles = [f"Space Racer {n} - Deluxe Edition for the Nintendo Switch" for n in range(40)]
    table = pa.table({
        "instruction": [f"The user bought, in this order: {', '.join(titles[(r + k) % 40] for k in range(8))}. "
                        "Which item will the user buy next?" for r in range(rows)],
        "target": [titles[(r + 9) % 40] for r in range(rows)],
        "template": ["gpu-check"] * rows,
    })
    for split in ("train", "valid", "test"):
        pq.write_table(table, directory / f"{split}.parquet")
    return directory


def _python_module(python: str, *args: str) -> list[str]:
    return [python, "-m", *args]


def step_commands(python: str, out: Path, tok: str, work: Path) -> dict[str, list[str]]:
    """Each step's command, in STEPS order."""
    commands = {
        "tests": _python_module(python, "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                                f"--junitxml={out / 'pytest-gpu.xml'}", "tests"),
        "kernel": _python_module(python, "instructrec.bench.log_softmax_gather", "--device", "cuda", "--sweep",
                                 "--sizes", "16384", "--repeats", "3"),
        "engine": _python_module(python, "instructrec.bench.gpu_engine", "--tokenizer", tok,
                                 "--json", str(out / "engine.json")),
        "bench": _python_module(python, "instructrec", "bench", "--device", "cuda", "--models",
                                "random:flan-t5-base", "--workloads", ",".join(ENGINE_WORKLOADS),
                                "--providers", ",".join(BENCH_BASE_PROVIDERS), "--requests", "64",
                                "--out", str(out / "bench")),
        "bench-xl": _python_module(python, "instructrec", "bench", "--device", "cuda", "--models",
                                   "random:flan-t5-xl", "--workloads", "rerank-10",
                                   "--providers", ",".join(BENCH_XL_PROVIDERS), "--requests", "32",
                                   "--peer-requests", "8", "--out", str(out / "bench-xl")),
        "train": _python_module(python, "instructrec", "train", "--instructions", str(work / "instructions"),
                                "--model", "random:flan-t5-xl", "--tokenizer", tok, "--out", str(work / "train"),
                                "--device", "cuda", "--precision", "bf16", "--optimizer", "adafactor",
                                "--gradient-checkpointing", "--max-steps", str(TRAIN_STEPS), "--batch-size", "8",
                                "--max-source-length", "256", "--max-target-length", "32", "--no-rank-eval",
                                "--eval-max-rows", "8", "--no-progress"),
    }
    return {name: commands[name] for name in STEPS}


def train_figures(metrics_path: Path) -> dict:
    """steps/s over the steps after the first (its time includes CUDA and allocator warm-up) and
    any peak-memory figure the training loop logged."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r for r in records if r.get("kind") == "train"]
    out: dict = {"steps": len(steps)}
    timed = [r["examples"] / r["examples_per_s"] for r in steps[1:] if r.get("examples_per_s")]
    if timed:
        out["steps_per_s"] = round(len(timed) / sum(timed), 3)
        out["examples_per_s"] = round(sum(r["examples"] for r in steps[1:]) / sum(timed), 2)
    memory = [v for r in records for k, v in r.items() if "memory" in k and isinstance(v, (int, float))]
    if memory:
        out["logged_peak_memory"] = max(memory)
    return out


def run_step(name: str, cmd: list[str], args, out: Path, work: Path, python: str, limit: float) -> Step:
    step = Step(name, command=cmd)
    if name == "train":
        write_train_instructions(work / "instructions")
    t0 = time.perf_counter()
    with GpuMemorySampler() as sampler:
        status, tail = run_logged(cmd, limit, out / "logs" / f"{name}.log")
    step.seconds = round(time.perf_counter() - t0, 1)
    step.peak_gpu_memory_mib = sampler.peak
    step.status, step.log_tail = status, tail
    if status == "timeout":
        step.reason = f"stopped at its {limit:.0f} s limit"
    try:
        if name == "tests" and (out / "pytest-gpu.xml").exists():
            step.results = parse_junit(out / "pytest-gpu.xml")
            if step.results["tests"] == 0:
                step.status, step.reason = "failed", "pytest collected no gpu test"
        elif name == "kernel":
            step.results = {"table": "\n".join(line for line in tail.splitlines() if line.startswith("|"))}
        elif name == "engine" and (out / "engine.json").exists():
            step.results = json.loads((out / "engine.json").read_text())
        elif name in ("bench", "bench-xl") and (out / name / "results.md").exists():
            step.results = {"table": (out / name / "results.md").read_text()}
        elif name == "train" and (work / "train" / "metrics.jsonl").exists():
            step.results = train_figures(work / "train" / "metrics.jsonl")
    except (OSError, ValueError, KeyError, ET.ParseError) as e:
        step.reason = (step.reason + "; " if step.reason else "") + f"cannot read its results: {e}"
    if status == "failed" and not step.reason:
        step.reason = "exited with an error: see the log tail"
    return step


# ---- report -------------------------------------------------------------------------------------


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    env = report.get("environment") or {}
    devices = env.get("devices") or (report.get("machine") or {}).get("gpus") or []
    lines = ["# gpu-check", "", f"- started {report['started']}, {report['total_s']:.0f} s, "
             f"budget {report['budget_s']:.0f} s{' (dry run: nothing ran)' if report['dry_run'] else ''}",
             f"- host {report['host']}"]
    for d in devices:
        lines.append(f"- GPU {d.get('index', 0)}: {d.get('name')} ({d.get('memory_gib', d.get('memory'))}"
                     f"{' GiB' if 'memory_gib' in d else ''}, capability {d.get('capability', '?')})")
    machine = report.get("machine") or {}
    if machine:
        lines.append(f"- driver {machine.get('driver')}, driver CUDA {machine.get('driver_cuda')}")
    if report.get("tokenizer"):
        lines.append(f"- tokenizer: {report['tokenizer']}")
    if env.get("torch"):
        versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
        lines.append(f"- python {env.get('python')}, torch {env['torch']} (CUDA {env.get('torch_cuda')}), {versions}")
        lines.append(f"- onnxruntime providers: {env.get('onnxruntime_providers')}")
    lines += ["", "| step | status | seconds | peak GPU memory (MiB, nvidia-smi) | note |", "|---|---|---:|---:|---|"]
    for s in report["steps"]:
        memory = "" if s["peak_gpu_memory_mib"] is None else f"{s['peak_gpu_memory_mib']:,.0f}"
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {memory} | {s['reason']} |")
    for s in report["steps"]:
        lines += ["", f"## {s['name']}: {s['status']}"]
        if s["command"]:
            lines += ["", "`" + " ".join(s["command"]) + "`"]
        if s["reason"]:
            lines += ["", s["reason"]]
        results = s["results"]
        if s["name"] == "tests" and "tests" in results:
            lines += ["", f"{results['passed']} passed, {results['failures'] + results['errors']} failed, "
                          f"{results['skipped']} skipped"]
            lines += [f"- FAILED {f['test']}: {f['message']}" for f in results["failed"]]
            lines += [f"- skipped x{n}: {reason}" for reason, n in results["skip_reasons"].items()]
        elif "table" in results:
            lines += ["", results["table"]]
        elif s["name"] == "engine" and isinstance(results, list) and results:
            keys = list(results[0])
            keys += [k for r in results for k in r if k not in keys]
            lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in results]
        elif results:
            lines += ["", "```", json.dumps(results, indent=1), "```"]
        if s["status"] in ("failed", "timeout") and s["log_tail"]:
            lines += ["", "<details><summary>log tail</summary>", "", "```", s["log_tail"][-2000:], "```", "</details>"]
    return "\n".join(lines) + "\n"


# ---- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "gpu-report")
    p.add_argument("--dry-run", action="store_true", help="write the plan as the report; run nothing")
    p.add_argument("--no-install", action="store_true", help="no setup: check with --python as it is")
    p.add_argument("--python", default=sys.executable, help="interpreter that has (or launches) the setup")
    p.add_argument("--venv", default=".venv-gpu", help="the environment the setup builds (repo-relative)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from {','.join(STEPS)}")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="time for all steps together")
    p.add_argument("--tokenizer", default=None, help="Flan-T5 tokenizer folder (default: shared/assets/...)")
    args = p.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        p.error(f"--steps: unknown {', '.join(unknown)}; use a comma-separated subset of {','.join(STEPS)}")
    out = args.out.resolve()
    started, t0 = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    machine = nvidia_smi()
    report = {"started": started, "host": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
              "budget_s": args.budget_s, "dry_run": args.dry_run, "machine": machine, "environment": None,
              "tokenizer": None, "steps": []}
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    tok = tokenizer_dir(args)
    tok_arg = str(tok) if tok else str(work / "generated-tokenizer")

    def finish(code: int) -> int:
        report["total_s"] = time.perf_counter() - t0
        write_report(out, {**report, "steps": [asdict(s) for s in report["steps"]]})
        shutil.rmtree(work, ignore_errors=True)
        return code

    if args.dry_run:
        python = args.python if args.no_install else str(venv_python((REPO / args.venv).resolve()))
        if not args.no_install:
            try:
                mode, commands, note = setup_commands(args, machine)
                report["steps"].append(Step("setup", command=commands[-1], reason=f"{mode}: {note}; "
                                            + " && ".join(" ".join(c) for c in commands)))
            except RuntimeError as e:
                report["steps"].append(Step("setup", status="failed", reason=str(e)))
        for name, cmd in step_commands(python, out, tok_arg, work).items():
            if name in steps:
                report["steps"].append(Step(name, command=cmd, reason="dry run"))
        return finish(0)
    if machine is None:
        reason = "no CUDA GPU here (nvidia-smi is absent or lists none): nothing was checked"
        report["steps"] = [Step(name, status="skipped", reason=reason) for name in steps]
        print(f"gpu-check: {reason}; report in {out}", file=sys.stderr)
        return finish(1)
    python = args.python
    if not args.no_install:
        setup, python = run_setup(args, machine, out)
        report["steps"].append(setup)
        if python is None:
            for name in steps:
                report["steps"].append(Step(name, status="skipped", reason="setup failed"))
            return finish(1)
    env = _environment(python)
    report["environment"] = env
    if not env.get("cuda_available"):
        reason = f"torch in {python} does not see the GPU: {env.get('error') or env.get('torch')}"
        report["steps"] += [Step(name, status="skipped", reason=reason) for name in steps]
        return finish(1)
    if {"engine", "train"} & set(steps):
        made, report["tokenizer"] = ensure_tokenizer(python, tok, work, out)
        tok_arg = str(made) if made else tok_arg
    deadline = time.perf_counter() + args.budget_s
    commands = step_commands(python, out, tok_arg, work)
    for name in steps:
        remaining = deadline - time.perf_counter()
        if remaining < 10:
            report["steps"].append(Step(name, status="skipped", command=commands[name],
                                        reason=f"the {args.budget_s:.0f} s budget was spent"))
            continue
        step = run_step(name, commands[name], args, out, work, python, min(STEP_LIMIT_S[name], remaining))
        report["steps"].append(step)
        print(f"gpu-check: {name} {step.status} ({step.seconds:.0f} s) {step.reason}", file=sys.stderr, flush=True)
        write_report(out, {**report, "total_s": time.perf_counter() - t0,
                           "steps": [asdict(s) for s in report["steps"]]})  # a killed run still leaves a report
    failed = [s.name for s in report["steps"] if s.status in ("failed", "timeout")]
    return finish(1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
