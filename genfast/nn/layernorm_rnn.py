"""Layer-normalised LSTM and GRU (issue 19): recurrent layers that torch.nn does not fuse.

    LayerNormLSTM.forward -> genfast.ops.layernorm_rnn.layernorm_lstm (one call per layer and direction)
        -> torch.ops.genfast.layernorm_lstm_forward -> csrc/cpu/rnn_layernorm.cpp (CUDA: csrc/cuda/rnn_layernorm_glue.cpp)

Their equations: csrc/rnn/layernorm_cells.h and genfast.reference.layernorm_lstm_cell /
layernorm_gru_cell. Constructor, parameters (torch's names plus the LN gains and biases, with torch's
``_l{k}`` and ``_reverse`` suffixes), forward signature and outputs follow torch.nn.LSTM / GRU
(without proj_size). CPU and CUDA (on CUDA float16 and bfloat16 too, with float accumulation).

The regularisers (zoneout, cell_zoneout, recurrent_dropout, weight_dropout) are genfast.nn.LSTM's
(genfast.nn.rnn._RegularizedRNN: the same semantics, the same mask draws), fused in the LN kernels.
"""
from __future__ import annotations

import torch
from torch import Tensor

from genfast.nn.rnn import _FusedRNNBase, _RegularizedRNN
from genfast.ops import layernorm_rnn as _ln_ops

__all__ = ["LayerNormLSTM", "LayerNormGRU"]


class _LayerNormRNNBase(_RegularizedRNN, _FusedRNNBase):
    """Adds the LN parameters of each layer and direction to torch's RNN parameters."""

    # (name prefix, width in units of hidden_size: None for one per gate) of each LN parameter; gains
    # start at 1, biases (names with "bias") at 0.
    _layer_norm_params: tuple[tuple[str, int | None], ...] = ()

    def _register_layer_norm(self, device, dtype) -> None:
        gates = {"LSTM": 4, "GRU": 3}[self.mode]
        names = []
        for layer in range(self.num_layers):
            for suffix in ("", "_reverse")[:2 if self.bidirectional else 1]:
                per_direction = []
                for prefix, gate_width in self._layer_norm_params:
                    width = (gates if gate_width is None else gate_width) * self.hidden_size
                    name = f"{prefix}_l{layer}{suffix}"
                    self.register_parameter(name, torch.nn.Parameter(torch.empty(width, device=device, dtype=dtype)))
                    per_direction.append(name)
                names.append(per_direction)
        self._layer_norm_names = names
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's initialisation of the RNN weights; LN gains 1, LN biases 0; forget_bias added to
        the f slice of each bias_ih (LSTM)."""
        super().reset_parameters()
        if not hasattr(self, "_layer_norm_names"):  # RNNBase.__init__: the LN parameters come next
            return
        with torch.no_grad():
            for per_direction in self._layer_norm_names:
                for name in per_direction:
                    getattr(self, name).fill_(0.0 if "bias" in name else 1.0)
            forget_bias = getattr(self, "forget_bias", 0.0)
            if forget_bias and self.bias:
                h = self.hidden_size
                for name in self._flat_weights_names:
                    if name.startswith("bias_ih"):
                        getattr(self, name)[h:2 * h] += forget_bias

    def _layer_weights(self, index: int):
        w_ih, w_hh, b_ih, b_hh, _ = super()._layer_weights(index)
        return (w_ih, w_hh, b_ih, b_hh, *(getattr(self, name) for name in self._layer_norm_names[index]))

    def _regularized(self, input, states, weights, batch_sizes):
        """The layer's weights (W_hh after weight dropout) and the ops' mask arguments (_RegularizedRNN)."""
        if not self._regularizers_active():
            return weights, {}
        w_ih, w_hh, *rest = weights
        w_hh, masks = self._regularize(input, batch_sizes, states, w_hh)
        return (w_ih, w_hh, *rest), masks

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + (f", forget_bias={self.forget_bias}" if getattr(self, "forget_bias", 0.0) else "")


class LayerNormLSTM(_LayerNormRNNBase):
    """An LSTM with layer normalisation inside the cell, fused (gates i, f, g, o as torch.nn.LSTM):

    a_t = LN(W_ih x_t) * ln_ih_weight + LN(W_hh h_{t-1}) * ln_hh_weight + b_ih + b_hh
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(LN(c_t) * ln_cell_weight + ln_cell_bias)

    LN normalises over the last dimension (biased variance, eps 1e-5). Parameters: torch.nn.LSTM's,
    plus ln_ih_weight_l{k} and ln_hh_weight_l{k} (4H, init 1), ln_cell_weight_l{k} (H, init 1) and
    ln_cell_bias_l{k} (H, init 0), ``_reverse`` for the backward direction. ``forget_bias`` is added to
    the f slice of bias_ih at initialisation.

    Regularisers (0 = off), as genfast.nn.LSTM's (see genfast.nn.rnn._RegularizedRNN): ``zoneout`` and
    ``cell_zoneout`` (h_t = m h_{t-1} + (1 - m) h~_t, m ~ Bernoulli(p) per row, unit and step in training,
    m = p in eval; h~_t, c~_t as above, with LN(c~_t)), ``recurrent_dropout`` (one mask per row and unit
    per call on h_{t-1} inside LN(W_hh h_{t-1}); the carried state is not masked), ``weight_dropout``
    (DropConnect on W_hh). The dropouts act only in training.
    """

    _layer_norm_params = (("ln_ih_weight", None), ("ln_hh_weight", None), ("ln_cell_weight", 1), ("ln_cell_bias", 1))

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, zoneout: float = 0.0,
                 cell_zoneout: float = 0.0, recurrent_dropout: float = 0.0, weight_dropout: float = 0.0,
                 forget_bias: float = 0.0, device=None, dtype=None) -> None:
        if forget_bias and not bias:
            raise ValueError(f"{type(self).__name__}: forget_bias={forget_bias} needs bias=True")
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype)
        self._set_regularizers(zoneout=zoneout, cell_zoneout=cell_zoneout, recurrent_dropout=recurrent_dropout,
                               weight_dropout=weight_dropout)
        self.forget_bias = float(forget_bias)
        self._register_layer_norm(device, dtype)

    def _layer(self, input, states, weights, batch_sizes, reverse):
        weights, masks = self._regularized(input, states, weights, batch_sizes)
        return _ln_ops.layernorm_lstm(input, states[0], states[1], *weights, batch_sizes, reverse, **masks)

    def forward(self, input, hx: tuple[Tensor, Tensor] | None = None):
        if hx is not None and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError(f"{type(self).__name__}: hx must be a tuple (h_0, c_0)")
        input, states, batch_sizes, sorted_i, unsorted_i, unbatched = self._prepare(
            input, hx, (self.hidden_size, self.hidden_size))
        output, states = self._run_layers(input, states, batch_sizes)
        output, (h_n, c_n) = self._finish(output, states, batch_sizes, sorted_i, unsorted_i, unbatched)
        return output, (h_n, c_n)


class LayerNormGRU(_LayerNormRNNBase):
    """A GRU with layer normalisation of both sides, fused (gates r, z, n as torch.nn.GRU):

    x^ = LN(W_ih x_t) * ln_ih_weight + b_ih,  h^ = LN(W_hh h_{t-1}) * ln_hh_weight + b_hh
    r = sigmoid(x^_r + h^_r), z = sigmoid(x^_z + h^_z), n = tanh(x^_n + r * h^_n)
    h_t = (1 - z) * n + z * h_{t-1}

    Parameters: torch.nn.GRU's plus ln_ih_weight_l{k} and ln_hh_weight_l{k} (3H, init 1).
    Regularisers: ``zoneout``, ``recurrent_dropout``, ``weight_dropout``, as LayerNormLSTM's (the GRU's
    z h_{t-1} term reads the carried, unmasked h_{t-1}).
    """

    _layer_norm_params = (("ln_ih_weight", None), ("ln_hh_weight", None))

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, zoneout: float = 0.0,
                 recurrent_dropout: float = 0.0, weight_dropout: float = 0.0, forget_bias: float = 0.0,
                 device=None, dtype=None) -> None:
        if forget_bias:
            raise ValueError(f"{type(self).__name__}: forget_bias applies to an LSTM's forget gate; a GRU has none")
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype)
        self._set_regularizers(zoneout=zoneout, recurrent_dropout=recurrent_dropout, weight_dropout=weight_dropout)
        self.forget_bias = 0.0
        self._register_layer_norm(device, dtype)

    def _layer(self, input, states, weights, batch_sizes, reverse):
        weights, masks = self._regularized(input, states, weights, batch_sizes)
        return _ln_ops.layernorm_gru(input, states[0], *weights, batch_sizes, reverse, **masks)

    def forward(self, input, hx: Tensor | None = None):
        input, states, batch_sizes, sorted_i, unsorted_i, unbatched = self._prepare(input, hx, (self.hidden_size,))
        output, states = self._run_layers(input, states, batch_sizes)
        output, (h_n,) = self._finish(output, states, batch_sizes, sorted_i, unsorted_i, unbatched)
        return output, h_n
