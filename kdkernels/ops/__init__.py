"""Fake kernels and call wrappers of the compiled kdkernels._C operators, one file per op.

Their autograd is C++ (csrc/autograd.cpp, an Autograd dispatch-key kernel per op): the forward
and backward of a call never enter Python after the wrapper here.
"""
