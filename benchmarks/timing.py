"""Per-token timestamps inside one ``generate()``, shared by the benchmarks that time it."""

from __future__ import annotations

import time

import torch
from transformers import StoppingCriteria


class StepClock(StoppingCriteria):
    """Records a device-synchronized timestamp when each new token is out (generate checks its stopping
    criteria once per token, and synchronizes there anyway). Never stops generation."""

    def __init__(self, sync):
        self.sync, self.times = sync, []

    def __call__(self, input_ids, scores, **kwargs):
        self.sync()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
