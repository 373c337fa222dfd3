"""Typed wrappers over the core's compiled operators ``torch.ops.genfast.*`` (RNN and attention).

Importing this package loads ``genfast._C`` (raising ImportError with build
instructions if it is missing) and registers, for each op, its fake (meta) kernel
for torch.compile / export and, where a backend's kernel is Triton, that kernel.
One module per op family. Generation's ops are in genfast.generation.ops.
"""
from genfast import _extension

_extension.load()

from genfast.ops import attention  # noqa: E402
from genfast.ops import attention_varlen  # noqa: E402
from genfast.ops.rnn import gru, lstm  # noqa: E402
from genfast.ops.rnn import gru_reset_before  # noqa: E402
from genfast.ops.layernorm_rnn import layernorm_gru, layernorm_lstm  # noqa: E402

__all__ = ["lstm", "gru", "attention", "attention_varlen", "gru_reset_before", "layernorm_lstm", "layernorm_gru"]
