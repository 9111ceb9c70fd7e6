"""Triton kernels (CUDA devices, or the CPU under TRITON_INTERPRET=1)."""
from ..backends import fix_triton_interpreter_bf16_casts

fix_triton_interpreter_bf16_casts()  # a no-op on GPUs; under TRITON_INTERPRET=1, bfloat16 casts round as on a GPU
