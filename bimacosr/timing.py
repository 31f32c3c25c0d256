"""Timing variants of one piece of work interleaved in one process (the benchmark scripts, deploy/rates.py).

A shared machine's load changes from second to second; timing variant A for a while and then
variant B measures the machine as much as the variants. Here every round runs each variant once,
in an order rotated by one each round, after one warm-up call each, so that load hits all alike
and the medians compare (docs/speed.md §2).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch


def interleaved_medians(jobs: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median wall seconds of each job over ``rounds`` rounds (after one warm-up call each, not
    counted), the order rotated by one each round; run under ``torch.inference_mode``."""
    names, times = list(jobs), {name: [] for name in jobs}
    with torch.inference_mode():
        for job in jobs.values():
            job()
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                jobs[name]()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
