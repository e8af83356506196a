"""Measurement: peak memory of a step, parameter counts.

CPU peak memory is the process's resident set size sampled every few milliseconds by a background thread during
the step (the peak of the step itself, unlike ru_maxrss, which is the peak of the whole process lifetime). GPU peak
memory is torch's max_memory_allocated / max_memory_reserved after a reset.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

GIB = 1024 ** 3


@dataclass
class PeakMemory:
    device: str
    peak_bytes: int = 0          # CPU: peak RSS during the step; GPU: max_memory_allocated
    baseline_bytes: int = 0      # at the start of the step
    reserved_bytes: int | None = None  # GPU only: max_memory_reserved

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def increase_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes

    def to_json(self) -> dict:
        return {"device": self.device, "peak_bytes": self.peak_bytes, "baseline_bytes": self.baseline_bytes,
                "reserved_bytes": self.reserved_bytes, "peak_gib": round(self.peak_gib, 4),
                "increase_gib": round(self.increase_bytes / GIB, 4)}


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


@contextmanager
def peak_memory(device: str | torch.device = "cpu", interval_s: float = 0.002):
    """Context manager yielding a PeakMemory that is filled in when the block exits."""
    dev = torch.device(device)
    result = PeakMemory(str(dev))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        result.baseline_bytes = torch.cuda.memory_allocated(dev)
        try:
            yield result
        finally:
            torch.cuda.synchronize(dev)
            result.peak_bytes = torch.cuda.max_memory_allocated(dev)
            result.reserved_bytes = torch.cuda.max_memory_reserved(dev)
        return
    result.baseline_bytes = peak = _rss()
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss())
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result.peak_bytes = max(peak, _rss())


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
