"""genfast's Triton kernels, installed as the subpackage ``genfast.kernels``."""
