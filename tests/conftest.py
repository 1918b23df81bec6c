import os

# MKL's SVD and small GEMMs are erratic with two threads on small CPU machines; one thread is fast and repeatable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

torch.set_num_threads(1)
