"""Rank 1 prints 30 numbered lines, then raises; every other rank waits forever (no torch)."""

import os
import time

if __name__ == "__main__":
    rank = int(os.environ["RANK"])
    if rank == 1:
        for i in range(30):
            print(f"rank 1 line {i}")
        raise RuntimeError("boom on rank 1")
    print(f"rank {rank} waiting")
    while True:
        time.sleep(1)
