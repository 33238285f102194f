"""Fake kernels and autograd for the compiled kdkernels._C operators, one file per op."""
