"""PinnedUploads: the values arrive shaped as given; on CUDA, a pinned slot whose copy has
not run yet is never rewritten (the stream is held back by a sleeping kernel, so every
copy is still queued when the ring comes round)."""

from __future__ import annotations

import pytest
import torch

from service.engine.execution.staging import PinnedUploads


def test_cpu_upload_and_copy_into_keep_shapes() -> None:
    uploads = PinnedUploads(torch.device("cpu"))
    flat = uploads.upload([3, 1, 4])
    assert flat.dtype == torch.long and flat.tolist() == [3, 1, 4]
    rows = uploads.upload([[1, 2, 3], [4, 5, 6]])
    assert rows.shape == (2, 3) and rows.tolist() == [[1, 2, 3], [4, 5, 6]]
    dst = torch.zeros(5, dtype=torch.long)
    assert uploads.copy_into(dst[1:3], [7, 8]).tolist() == [7, 8]
    assert dst.tolist() == [0, 7, 8, 0, 0]
    assert uploads.upload([]).shape == (0,)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_values_arrive_shaped() -> None:
    uploads = PinnedUploads(torch.device("cuda"), slot_values=16, slots=2)
    assert uploads.upload([[1, 2], [3, 4]]).tolist() == [[1, 2], [3, 4]]
    dst = torch.zeros(6, dtype=torch.long, device="cuda")
    uploads.copy_into(dst[2:5], [9, 8, 7])
    assert dst.tolist() == [0, 0, 9, 8, 7, 0]
    big = list(range(40))  # more than a slot holds: a fresh pinned block
    before = uploads.fresh_blocks
    assert uploads.upload(big).tolist() == big
    assert uploads.fresh_blocks == before + 1


@cuda
def test_cuda_busy_slot_is_not_rewritten() -> None:
    slots = 4
    uploads = PinnedUploads(torch.device("cuda"), slot_values=8, slots=slots)
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # holds the stream: no copy queued below runs for a while
    outs = [uploads.upload([i, i + 1, i + 2]) for i in range(3 * slots)]
    # The first `slots` uploads took the ring; while their copies wait, the rest took fresh blocks.
    assert uploads.fresh_blocks == 2 * slots
    torch.cuda.synchronize()
    assert [o.tolist() for o in outs] == [[i, i + 1, i + 2] for i in range(3 * slots)]
    # Once the copies have run, the ring is used again.
    uploads.upload([1])
    assert uploads.fresh_blocks == 2 * slots
