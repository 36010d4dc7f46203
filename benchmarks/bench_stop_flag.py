"""Cost of the per-step stop agreement (one all-reduce of one int64) on 2 CPU ranks, gloo.

    python benchmarks/bench_stop_flag.py [iterations]
"""
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from open_clip_train.distributed import all_reduce_max_int


def worker(rank: int, port: int, iters: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for _ in range(20):  # warm up the connections
        all_reduce_max_int(0, torch.device("cpu"))
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        all_reduce_max_int(0, torch.device("cpu"))
    per_call = (time.perf_counter() - t0) / iters
    if rank == 0:
        print(f"stop agreement: {per_call * 1e6:.0f} us per step (mean of {iters}, 2 ranks, gloo, CPU)")
    dist.destroy_process_group()


if __name__ == "__main__":
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, iters), nprocs=2)
