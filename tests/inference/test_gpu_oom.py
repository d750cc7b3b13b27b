"""A real CUDA out-of-memory in a batch is split and retried (marker gpu: runs where CUDA exists)."""

from __future__ import annotations

import pytest

from serving.inference.batching import Batcher


@pytest.mark.gpu
def test_real_cuda_oom_batch_is_split_and_every_item_succeeds() -> None:
    torch = pytest.importorskip("torch")
    free, _ = torch.cuda.mem_get_info()
    # Each item needs a third of the free memory: a batch of 4 cannot fit, batches of 2 or 1 can.
    per_item = int(free * 0.3) // 4  # float32 elements
    sizes: list[int] = []

    def forward(batch: list[int]) -> list[int]:
        sizes.append(len(batch))
        block = torch.ones((len(batch), per_item), device="cuda")
        out = [int(block[i, :10].sum().item()) + x for i, x in enumerate(batch)]
        del block
        return out

    batcher = Batcher("gpu-oom", forward, max_batch_size=4, max_wait_ms=100)
    futures = [batcher.submit(i) for i in range(4)]
    assert [f.result(timeout=60) for f in futures] == [10, 11, 12, 13]
    assert sizes[0] == 4 and max(sizes[1:]) <= 2
