"""Starts the heartbeat the launcher asked for, prints its pid, then meets the other ranks in a
barrier (600 s timeout) every 0.2 s until killed: one stopped rank holds up everyone."""

import datetime
import os
import time

import torch.distributed as dist

from hetsp import heartbeat
from launcher.rank_env import RankEnv

if __name__ == "__main__":
    env = RankEnv.from_environ()
    heartbeat.start_from_env(env.rank)
    dist.init_process_group(env.backend, timeout=datetime.timedelta(seconds=600))
    dist.barrier()
    print(f"ready pid {os.getpid()}", flush=True)
    while True:
        dist.barrier()
        time.sleep(0.2)
