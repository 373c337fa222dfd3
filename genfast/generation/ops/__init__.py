"""Typed wrappers over generation's compiled operators, one module per op.

Importing this package loads ``genfast._C`` (raising ImportError with build instructions if it is
missing), whose csrc/generation/registration.cpp declares the schemas and whose CPU kernels
register themselves. Each module here adds the op's fake kernel and, where the op has one, its
CUDA kernel (Triton, from genfast.kernels) by ``torch.library.register_kernel``.
"""
from genfast import _extension

_extension.load()

# Modules, not their functions: each op's function has its module's name (ops.decode_linear.decode_linear).
from genfast.generation.ops import decode_attention, decode_linear, gpt2_decode, sampling  # noqa: E402

__all__ = ["decode_attention", "decode_linear", "gpt2_decode", "sampling"]
