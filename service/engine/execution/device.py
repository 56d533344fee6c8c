"""Host -> device copies that never synchronise with the device.

A plain `torch.tensor(data, device="cuda")` copies from pageable memory and waits for the
stream; going through pinned memory with `non_blocking=True` queues the copy instead (the
caching host allocator keeps the pinned block alive until the copy has run). This keeps a
decode pass at exactly one device -> host synchronisation: the verdicts.
"""

from __future__ import annotations

from typing import Any

import torch


def to_device(data: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`data` (nested Python lists of numbers) as a tensor on `device`, without a sync."""
    if device.type == "cpu":
        return torch.tensor(data, dtype=dtype)
    return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
