"""Prints its pid, then sleeps until killed (for signal tests; no torch)."""

import os
import time

if __name__ == "__main__":
    print(f"ready pid {os.getpid()}", flush=True)
    while True:
        time.sleep(1)
