"""Microbenchmarks of the kdkernels ops against eager PyTorch and torch.compile: python -m bench."""
