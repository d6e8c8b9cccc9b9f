"""Triton kernels of tempspec (installed as tempspec_engine.kernels); see acceptance_triton.py."""
