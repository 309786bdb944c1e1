"""hetsp: per-batch heterogeneous sequence parallelism for long-context LM training.

Importing the package is light (no torch, no PuLP): `hetsp.plan` and
`hetsp.config` are pure Python, and everything else is imported where used.
"""

__version__ = "0.1.0"
