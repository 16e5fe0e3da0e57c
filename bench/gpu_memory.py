"""Peak GPU memory of this process while a workload runs, for the providers whose memory torch
does not allocate (onnxruntime's arenas, CTranslate2's caching allocator).

torch's own figure (torch.cuda.max_memory_allocated) covers only tensors torch allocated: the
torch engine and Hugging Face in full, the onnx engine's inputs and outputs (IO binding on torch
tensors) but not onnxruntime's arena, and nothing of CTranslate2. So every GPU run also samples
`nvidia-smi --query-compute-apps=pid,used_memory` for this process's pid in a thread, every
SAMPLE_INTERVAL_S. That figure is what the driver charges the process: it includes the CUDA
context (a few hundred MiB) and memory the libraries keep cached, and a sampler can miss a peak
shorter than its interval. Where nvidia-smi is absent, or lists no process with this pid (a
container with its own PID namespace shows host pids or none), the figure is left out and the
reason given.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 0.1  # one nvidia-smi call takes ~20-50 ms; 10 samples a second stay cheap


def process_memory_mib(text: str, pid: int) -> float | None:
    """This pid's used GPU memory in MiB from `nvidia-smi --query-compute-apps=pid,used_memory
    --format=csv,noheader,nounits` output (summed over GPUs), or None when it is not listed."""
    total, seen = 0.0, False
    for line in text.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 2 or not fields[0].isdigit() or int(fields[0]) != pid:
            continue
        try:
            total += float(fields[1])
        except ValueError:  # "[N/A]" on some drivers
            continue
        seen = True
    return total if seen else None


class ProcessGpuMemorySampler:
    """`with ProcessGpuMemorySampler() as s: ...`, then `s.peak_mib` (None with `s.note` saying why)."""

    def __init__(self, pid: int | None = None, interval_s: float = SAMPLE_INTERVAL_S,
                 executable: str | None = None):
        self.pid = os.getpid() if pid is None else pid
        self.interval_s = interval_s
        self.executable = executable or shutil.which("nvidia-smi")
        self.peak_mib: float | None = None
        self.note: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._samples = 0

    def _sample(self) -> None:
        try:
            out = subprocess.run([self.executable, "--query-compute-apps=pid,used_memory",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10,
                                 check=True).stdout
        except (OSError, subprocess.SubprocessError) as e:
            self.note = f"nvidia-smi failed ({e})"
            self._stop.set()
            return
        self._samples += 1
        used = process_memory_mib(out, self.pid)
        if used is not None:
            self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "ProcessGpuMemorySampler":
        if self.executable is None:
            self.note = "nvidia-smi not found: no per-process GPU memory figure"
            return self
        self._thread = threading.Thread(target=self._loop, name="gpu-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        if self.note is None:
            self._sample()  # the end state too: a workload shorter than one interval still gets a figure
        if self.peak_mib is None and self.note is None:
            self.note = (f"nvidia-smi lists no process with pid {self.pid} in {self._samples} samples "
                         "(a container's PID namespace?)")
