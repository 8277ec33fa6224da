"""Steady-state figures of `flantune train` runs, shared by the benchmarks that read its
metrics.jsonl (bench/recipe_speed.py, bench/multi_gpu.py), so that both count the same steps."""

from __future__ import annotations

import math
from pathlib import Path


def log_every_for(steps: int) -> int:
    return max(1, min(10, steps // 10))


def steady_start(steps: int, log_every: int) -> int:
    """Steps left out before steady-state timing: the first 20% (compilation, allocator warm-up),
    rounded up to a log window so that every side counts the same steps."""
    skip = -(-math.ceil(steps / 5) // log_every) * log_every
    return skip if skip < steps else (steps - 1) // log_every * log_every


def steady_rate(windows: list[tuple[int, int, float]], skip: int) -> float | None:
    """Steady-state tokens/s from (first step before, last step, tokens/s) windows: the mean over the
    windows after step `skip`, each weighted by the steps it spans."""
    counted = [(last - before, rate) for before, last, rate in windows if before >= skip]
    return sum(n * rate for n, rate in counted) / sum(n for n, _ in counted) if counted else None


def log_windows(records: list[dict]) -> list[tuple[int, int, float]]:
    """metrics.jsonl's tokens/s records as windows: each covers the steps after the previous
    record's, up to its own."""
    windows, before = [], 0
    for r in records:
        if "tokens_per_s" in r:
            windows.append((before, r["step"], r["tokens_per_s"]))
            before = r["step"]
    return windows


def tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.rstrip().splitlines()[-lines:])
