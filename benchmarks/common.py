"""Shared bits of the benchmarks: interleaved timing with medians, CPU-utilisation readout, peak RSS."""

import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def interleaved(fns: dict, windows: int = 5, calls: int = 3) -> dict:
    """Median seconds per call of each function, run in alternating windows so that a slow spell of this shared VM
    hits every side alike. Also returns the CPU-time / wall-time ratio ("util"; 1.0 = the one thread really ran)."""
    times = {name: [] for name in fns}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(windows):
        for name, fn in fns.items():
            for _ in range(calls):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    util = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    return {name: statistics.median(ts) for name, ts in times.items()} | {"util": util}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def hwm_peak_bytes() -> int:
    """VmHWM: this process image's own peak RSS (for a child process: ru_maxrss would include the parent's at fork
    time)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
