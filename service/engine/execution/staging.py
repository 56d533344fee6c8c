"""A decode pass's integer inputs reach the device in one copy, without a synchronisation."""

from __future__ import annotations

import torch

from service.engine.execution.device import to_device


class UploadStaging:
    """A persistent pinned host buffer and a persistent device buffer (CUDA only).

    A non_blocking copy out of pinned memory is only queued on the stream, so the pinned
    buffer must not be rewritten before it has run: the caller calls synchronized() after
    the pass's one device -> host copy on the same stream (or after synchronising the stream
    when a pass fails). Meanwhile any other upload takes a fresh pinned block
    (execution.device.to_device). The device buffer is reused in stream order.
    """

    def __init__(self, device: torch.device, size: int) -> None:
        self.device = device
        self.size = size
        self._pending = False  # a copy out of the pinned buffer may not have run yet
        if device.type == "cuda":
            self._host = torch.empty(size, dtype=torch.long, pin_memory=True)
            self._host_view = self._host.numpy()  # writes a Python list in one call
            self._dev = torch.empty(size, dtype=torch.long, device=device)
            # (host slice, device slice) per length: the same few lengths recur pass after pass.
            self._slices: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def upload(self, values: list[int]) -> torch.Tensor:
        """`values` as a [len(values)] long tensor on the device; valid until the next upload."""
        n = len(values)
        if self.device.type != "cuda" or n > self.size or self._pending:
            return to_device(values, torch.long, self.device)
        slices = self._slices.get(n)
        if slices is None:
            slices = self._slices[n] = (self._host[:n], self._dev[:n])
        self._host_view[:n] = values
        slices[1].copy_(slices[0], non_blocking=True)
        self._pending = True
        return slices[1]

    def synchronized(self) -> None:
        """The stream has been synchronised since the last upload: its copy has run."""
        self._pending = False
