"""All-reduces (rank + 1) over the world and checks the sum; the expected world size, when
HETSP_TEST_EXPECT_WORLD is set, is checked too. Prints one line per rank."""

import os

import torch
import torch.distributed as dist

from launcher.rank_env import RankEnv

if __name__ == "__main__":
    env = RankEnv.from_environ()
    dist.init_process_group(env.backend)
    try:
        world = dist.get_world_size()
        expected = os.environ.get("HETSP_TEST_EXPECT_WORLD")
        if expected is not None and world != int(expected):
            raise RuntimeError(f"world size {world}, expected {expected}")
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        want = world * (world + 1) / 2
        if t.item() != want:
            raise RuntimeError(f"all_reduce gave {t.item()}, expected {want}")
        print(f"rank {dist.get_rank()} of {world}: sum {t.item():g} ok on {env.device} with {env.backend}")
    finally:
        dist.destroy_process_group()
