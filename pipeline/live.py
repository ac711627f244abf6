"""DVCLive helpers shared by the training stages."""

from __future__ import annotations


class PhaseLogger:
    """DVCLive has one step counter; each training phase logs against its own step axis."""

    def __init__(self, live) -> None:
        self.live = live
        self.steps: dict[str, int] = {}

    def __call__(self, phase: str, values: dict[str, float]) -> None:
        step = self.steps.get(phase, 0)
        self.live.step = step
        for name, value in values.items():
            self.live.log_metric(f"{phase}/{name}", value)
        self.steps[phase] = step + 1
