"""One row's sampling parameters: plain data, no torch, so that request validation
(service/engine/validation.py) runs in a process that never imports torch (the gRPC front end
of service/engine_process)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RowSampling:
    """One row's sampling parameters (already validated)."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
