import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

# One thread: two are erratic when the machine is busy, and one keeps seeded runs exact.
torch.set_num_threads(1)
