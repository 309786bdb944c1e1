"""Starts hetsp's ranks: simulated ranks on one host, or multi-node jobs through torchrun.

Entry point: ``hetsp-launch`` / ``python -m launcher`` (see `launcher.__main__`).
Importing this package imports neither torch nor hetsp's runtime; the launcher
imports torch only to count GPUs when ``--device auto`` needs it.
"""
