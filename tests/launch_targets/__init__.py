"""Small rank programs that tests run through the launcher in place of hetsp.train.

Each is started as ``python -m tests.launch_targets.<name> CONFIG [--set ...] [--resume] [--dry-run]``
with the launcher's rank environment (see launcher.rank_env).
"""
