import os

import torch

# CI and developer machines have 2 cores and the suite runs as two pytest-xdist workers (README test command):
# one thread per process (also for the scripts the tests start), so two processes never fight over a core.
# Tiny test models gain nothing from a second thread (measured: the same wall time on one thread).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
