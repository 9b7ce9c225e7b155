"""Peak memory of the whole simulation: this process and every descendant (Ray's raylet, GCS, workers).

Sampled by a background thread; resident set sizes are summed per process, so pages shared
between processes (torch's libraries, Ray's object store) count once per process: an upper
bound. PSS (proportional set size, shared pages split between their users) is summed too where
the kernel reports it: closer to what the machine really spends.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import TracebackType

import psutil

MB = 1024 * 1024


@dataclass
class Peak:
    rss_mb: float = 0.0
    pss_mb: float = 0.0
    processes: int = 0
    driver_rss_mb: float = 0.0

    def to_json(self) -> dict[str, float | int]:
        return {"peak-rss-mb": round(self.rss_mb, 1), "peak-pss-mb": round(self.pss_mb, 1),
                "peak-processes": self.processes, "driver-peak-rss-mb": round(self.driver_rss_mb, 1)}


class PeakMemory:
    """`with PeakMemory() as mem: ...` then `mem.peak`."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak = interval, Peak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fedhosp-memory", daemon=True)
        self._root = psutil.Process()

    def __enter__(self) -> PeakMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        rss = pss = 0
        procs = [self._root, *self._root.children(recursive=True)]
        counted = 0
        for proc in procs:
            try:
                info = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            counted += 1
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        p = self.peak
        p.rss_mb, p.pss_mb = max(p.rss_mb, rss / MB), max(p.pss_mb, pss / MB)
        p.processes = max(p.processes, counted)
        p.driver_rss_mb = max(p.driver_rss_mb, self._root.memory_info().rss / MB)
