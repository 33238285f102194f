"""Adapters that register kdkernels losses with other distillation frameworks (import on demand)."""
