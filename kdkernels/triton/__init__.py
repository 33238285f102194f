"""Triton kernels for the kdkernels losses, one module per op (Liger-Kernel style: the kernels,
their launcher and the autograd registration live together in that module).

They run on CUDA tensors, or on CPU tensors in the Triton interpreter when TRITON_INTERPRET=1 is
set before triton, torch and kdkernels are imported (a correctness tool: it is very slow).
"""
