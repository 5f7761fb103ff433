import torch

# CI and developer machines have 2 cores; more threads only add contention.
torch.set_num_threads(2)
