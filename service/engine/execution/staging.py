"""Integer inputs reach the device through persistent pinned memory, without a synchronisation.

A non_blocking copy out of pinned memory is only queued on the stream, so the pinned bytes
must not be rewritten before it has run. `execution.device.to_device` gets that right by
taking a fresh pinned block per upload from torch's caching host allocator (plus a CPU
tensor before it and a device tensor after it); on the hot paths (a decode pass's inputs,
the captured graphs' row starts, a prefill's prompt ids) that bookkeeping cost more host
time than the copy. Here a few pinned slots are reused in turn, each guarded by a CUDA
event recorded after the copy out of it: a slot whose copy may not have run yet is never
written; the upload takes the fresh-block path instead and waits for nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from service.engine.execution.device import to_device

DEFAULT_SLOT_VALUES = 8192  # int64 values a slot holds (64 KiB); longer uploads take a fresh block
DEFAULT_SLOTS = 8


class PinnedUploads:
    """Host -> device copies of int64 values (flat lists, or lists of equal-length rows)
    out of a ring of pinned slots, for one device. Off CUDA it builds plain tensors."""

    def __init__(
        self, device: torch.device, slot_values: int = DEFAULT_SLOT_VALUES, slots: int = DEFAULT_SLOTS
    ) -> None:
        self.device = device
        self.slot_values = slot_values
        self.fresh_blocks = 0  # uploads that took a fresh pinned block (slot busy or too small)
        self._next = 0
        if device.type == "cuda":
            self._host = torch.empty((slots, slot_values), dtype=torch.long, pin_memory=True)
            self._views = list(self._host.numpy())  # per slot: numpy writes a Python list in one call
            # Recorded after each copy out of the slot; an event never recorded counts as done.
            self._copied = [torch.cuda.Event() for _ in range(slots)]

    def upload(self, values: Sequence) -> torch.Tensor:
        """`values` as a new int64 tensor on the device, shaped like them ([N] or [R, C])."""
        shape = _shape(values)
        if self.device.type != "cuda":
            return torch.tensor(values, dtype=torch.long).reshape(shape)
        out = torch.empty(shape, dtype=torch.long, device=self.device)
        return self._copy(out, values, shape)

    def copy_into(self, dst: torch.Tensor, values: Sequence) -> torch.Tensor:
        """Queues the copy of `values` into `dst` (contiguous int64 on the device, as many
        elements, shaped like them); returns dst."""
        shape = _shape(values)
        if self.device.type != "cuda":
            return dst.copy_(torch.tensor(values, dtype=torch.long).reshape(shape))
        return self._copy(dst, values, shape)

    def _copy(self, dst: torch.Tensor, values: Sequence, shape: tuple[int, ...]) -> torch.Tensor:
        n = 1
        for size in shape:
            n *= size
        if n == 0:
            return dst
        slot = self._next
        if n > self.slot_values or not self._copied[slot].query():
            self.fresh_blocks += 1
            return dst.copy_(to_device(values, torch.long, self.device).reshape(shape))
        self._next = (slot + 1) % len(self._copied)
        view = self._views[slot][:n]
        if len(shape) == 1:
            view[:] = values
        else:
            view.reshape(shape)[...] = values
        dst.view(-1).copy_(self._host[slot, :n], non_blocking=True)
        self._copied[slot].record()  # on the current stream, behind the copy
        return dst


def _shape(values: Sequence) -> tuple[int, ...]:
    if values and isinstance(values[0], (list, tuple)):
        return (len(values), len(values[0]))
    return (len(values),)
