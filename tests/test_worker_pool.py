from __future__ import annotations

import torch

from attn_search.replay import worker_pool


def test_worker_pool_shares_this_process_s_torch_threads_among_its_workers() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(6)  # as on a 6-core machine, whatever this one has
        with worker_pool(2) as pool:  # 3 each, not 6 each (12 threads on 6 cores)
            assert {pool.submit(torch.get_num_threads).result() for _ in range(2)} == {3}
        with worker_pool(8) as pool:  # never 0
            assert {pool.submit(torch.get_num_threads).result() for _ in range(2)} == {1}
    finally:
        torch.set_num_threads(before)
