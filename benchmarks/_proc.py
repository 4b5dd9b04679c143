"""Run one command as a fresh process and measure it from outside: wall time from spawn to exit, the kernel's peak
resident set (``wait4``), and the GPU memory NVML sees the process hold (sampled; the CUDA context included).

No torch here: the parent of a benchmark stays free of CUDA, so that its own context never counts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Measured:
    returncode: int
    wall_s: float  # spawn to exit, as the parent sees it
    peak_rss_bytes: int  # ru_maxrss from wait4: the process's peak resident set, file-backed pages included
    peak_gpu_nvml_bytes: int | None  # NVML's used memory of this pid (context included); None when unknown
    nvml_how: str  # "per-process" (NVML reported the pid), "device" (device used minus the start), or ""
    stdout: str
    stderr: str
    extra: dict = field(default_factory=dict)


class GpuSampler:
    """Peak GPU memory of one process as NVML reports it, every ``interval`` seconds, from a thread. Uses pynvml
    where installed, else ``nvidia-smi --query-compute-apps`` (slower: each call takes tens of ms). Where the pid is
    never listed (a container's pid namespace), falls back to the device's used memory minus what it was at start."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.pid = 0
        self.peak_pid = 0
        self.peak_device = 0
        self.seen_pid = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None
        self._handles = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no pynvml, no driver: try nvidia-smi
            self._nvml = None
        self.available = bool(self._handles) or shutil.which("nvidia-smi") is not None
        self.baseline = self._device_used() if self.available else 0

    def _device_used(self) -> int:
        if self._nvml is not None:
            return sum(self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles)
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True
        ).stdout
        return sum(int(x) for x in out.split() if x.isdigit()) * 2**20

    def _pid_used(self) -> int | None:
        used = None
        if self._nvml is not None:
            for h in self._handles:
                for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(h):
                    if p.pid == self.pid and p.usedGpuMemory is not None:
                        used = (used or 0) + p.usedGpuMemory
            return used
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
        ).stdout
        for line in out.splitlines():
            pid, _, mem = line.partition(",")
            if pid.strip() == str(self.pid) and mem.strip().isdigit():
                used = (used or 0) + int(mem) * 2**20
        return used

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                used = self._pid_used()
                if used is not None:
                    self.seen_pid = True
                    self.peak_pid = max(self.peak_pid, used)
                self.peak_device = max(self.peak_device, self._device_used() - self.baseline)
            except Exception:  # a sample lost while the process exits
                pass
            self._stop.wait(self.interval)

    def start(self, pid: int) -> None:
        self.pid = pid
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> tuple[int | None, str]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.seen_pid:
            return self.peak_pid, "per-process"
        if self.available:
            return max(self.peak_device, 0), "device"
        return None, ""


def run_measured(cmd: list[str], *, cwd: Path, env: dict, log: Path, sample_gpu: bool) -> Measured:
    """Run ``cmd`` to completion; its stdout and stderr go to ``log``.out / ``log``.err (read back afterwards)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log.with_suffix(".out"), log.with_suffix(".err")
    sampler = GpuSampler() if sample_gpu else None
    with out_path.open("wb") as out, err_path.open("wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)
        if sampler is not None:
            sampler.start(proc.pid)
        # wait4, not Popen.wait: it returns this child's own rusage (ru_maxrss in KiB on Linux).
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    gpu, how = sampler.stop() if sampler is not None else (None, "")
    return Measured(
        returncode=proc.returncode,
        wall_s=wall,
        peak_rss_bytes=usage.ru_maxrss * 1024,
        peak_gpu_nvml_bytes=gpu,
        nvml_how=how,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
    )
