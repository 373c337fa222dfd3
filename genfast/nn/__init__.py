"""Drop-in torch.nn modules backed by genfast's fused kernels.

Importing genfast.nn loads the compiled extension; if it is missing this raises
ImportError with instructions to build it (there is no silent fallback to torch).
"""
from genfast import _extension

_extension.load()

from genfast.nn import functional  # noqa: E402
from genfast.nn.attention import MultiheadAttention, replace_attention  # noqa: E402
from genfast.nn.rnn import GRU, LSTM, GRUCell, LSTMCell, replace_rnns  # noqa: E402
from genfast.nn.layernorm_rnn import LayerNormGRU, LayerNormLSTM  # noqa: E402

__all__ = ["LSTM", "GRU", "LSTMCell", "GRUCell", "replace_rnns", "functional", "MultiheadAttention",
           "replace_attention", "LayerNormLSTM", "LayerNormGRU"]
