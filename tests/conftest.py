import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

# One thread: two are erratic when the machine is busy, and one keeps seeded runs exact.
torch.set_num_threads(1)


_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra):
    """The environment for a child process: without the rank/port variables this test
    process set for its own single-process DeepSpeed (a child would try the same port)."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env
