"""Rank 1 exits with status 3 after joining the process group; the others enter an all_reduce
that can never complete. If gloo notices the missing peer and raises, they block forever
anyway, as they would under NCCL."""

import os
import sys
import time

import torch
import torch.distributed as dist

if __name__ == "__main__":
    dist.init_process_group(os.environ["HETSP_DIST_BACKEND"])
    dist.barrier()
    if dist.get_rank() == 1:
        print("rank 1 leaving without a word")
        sys.stdout.flush()
        os._exit(3)
    print(f"rank {dist.get_rank()} entering all_reduce")
    try:
        dist.all_reduce(torch.ones(1))
    except Exception as e:
        print(f"all_reduce raised {type(e).__name__}; hanging anyway")
    while True:
        time.sleep(1)
