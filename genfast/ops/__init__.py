"""Typed wrappers over the compiled operators ``torch.ops.genfast.*``.

Importing this package loads ``genfast._C`` (raising ImportError with build
instructions if it is missing) and registers, for each op, its fake (meta) kernel
for torch.compile / export and its autograd formula. One module per op family.
"""
from genfast import _extension

_extension.load()

from genfast.ops import attention  # noqa: E402
from genfast.ops.rnn import gru, lstm  # noqa: E402
from genfast.ops.sampling import sampling_draw, sampling_filter  # noqa: E402
from genfast.ops.decode_attention import decode_attention  # noqa: E402
from genfast.ops.decode_linear import decode_linear  # noqa: E402
from genfast.ops.gpt2_decode import gpt2_decode_block  # noqa: E402

__all__ = ["lstm", "gru", "attention", "sampling_filter", "sampling_draw", "decode_attention", "decode_linear",
           "gpt2_decode_block"]
