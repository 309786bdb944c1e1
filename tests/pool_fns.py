"""Functions the rank-pool tests send to ranks (importable by reference)."""
import torch
import torch.distributed as dist


def rank_sum(x):
    t = torch.tensor([float(dist.get_rank() + x)])
    dist.all_reduce(t)
    return t.item()


def fail_on_rank(bad_rank):
    if dist.get_rank() == bad_rank:
        raise RuntimeError(f"boom on {bad_rank}")
    return dist.get_rank()
