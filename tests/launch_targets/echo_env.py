"""Prints, as one JSON line, its arguments and the launcher variables it received (no torch)."""

import json
import os
import sys

KEYS = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "OMP_NUM_THREADS", "HETSP_DEVICE", "HETSP_DIST_BACKEND", "HETSP_RUN_DIR"]

if __name__ == "__main__":
    print(f"hello from rank {os.environ.get('RANK')}")
    print("ENV " + json.dumps({"argv": sys.argv[1:], **{k: os.environ.get(k) for k in KEYS}}))
