"""bimacosr.timing: the benchmarks' interleaved rounds."""
import time

import torch

from bimacosr.timing import interleaved_medians


def test_rounds_rotate_the_order_after_one_warm_up_and_give_each_jobs_median():
    ran: list[str] = []
    jobs = {name: (lambda name=name: ran.append(name) or time.sleep(0.002 if name == "slow" else 0))
            for name in ("slow", "b", "c")}
    secs = interleaved_medians(jobs, rounds=4)
    assert ran == ["slow", "b", "c",  # warm-up
                   "slow", "b", "c", "b", "c", "slow", "c", "slow", "b", "slow", "b", "c"]
    assert list(secs) == ["slow", "b", "c"] and secs["slow"] >= 0.002 > max(secs["b"], secs["c"])
    assert interleaved_medians({"grad": lambda: ran.append(torch.is_inference_mode_enabled())}, 1) and ran[-1] is True
