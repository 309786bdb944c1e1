"""Rank 1 finishes at once with status 0; every other rank never finishes (no torch)."""

import os
import time

if __name__ == "__main__":
    rank = int(os.environ["RANK"])
    print(f"rank {rank} started", flush=True)
    if rank != 1:
        while True:
            time.sleep(1)
