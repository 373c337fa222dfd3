"""Keras 3 LSTM and GRU layers converted to genfast.nn.LSTM / GRU (``Module.from_keras(layer)``).

The converted module has ``batch_first=True`` like Keras and computes what the Keras layer computes: its
output is the sequence Keras returns with ``return_sequences=True``, and its final states are the ones Keras
returns with ``return_state=True`` (with the leading layers*directions axis torch puts on states).

Weight layout (Keras stores ``x @ kernel``, torch stores ``W @ x``, so every matrix is transposed):

    LSTM  kernel (I, 4H), recurrent_kernel (H, 4H), gates i, f, c, o  = torch's i, f, g, o
          -> weight_ih = kernel.T, weight_hh = recurrent_kernel.T
          bias (4H,), one bias -> bias_ih = bias, bias_hh = 0 (only their sum enters the cell)
    GRU   kernel (I, 3H), recurrent_kernel (H, 3H), gates z, r, h  ->  torch's r, z, n: blocks reordered
          reset_after=True:  bias (2, 3H) = input bias, recurrent bias -> bias_ih, bias_hh
          reset_after=False: bias (3H,), the input bias -> bias_ih, bias_hh = 0; the module is
          GRU(..., reset_after=False), Keras' n = tanh(W_in x + b_in + W_hn (r * h))

Values are read with ``keras.ops.convert_to_numpy`` (tested with Keras on the torch backend). keras is imported
only when a conversion is asked for; genfast does not depend on it.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["from_keras"]


def from_keras(cls, layer):
    """A ``cls`` (genfast.nn.LSTM or GRU, or a subclass with the same parameters) computing ``layer``."""
    import keras

    from genfast.nn.rnn import GRU, LSTM

    if issubclass(cls, LSTM):
        expected, convert = keras.layers.LSTM, _lstm_parameters
    elif issubclass(cls, GRU):
        expected, convert = keras.layers.GRU, _gru_parameters
    else:
        raise TypeError(f"{cls.__name__}.from_keras: only genfast.nn.LSTM and GRU have a Keras counterpart")
    if not isinstance(layer, expected):
        raise TypeError(f"{cls.__name__}.from_keras expects a built keras.layers.{expected.__name__}, "
                        f"got {type(layer).__module__}.{type(layer).__name__}")
    _check_layer(cls.__name__, layer, keras)

    kwargs, parameters = convert(layer)
    dtype = parameters["weight_ih_l0"].dtype
    module = cls(layer.cell.kernel.shape[0], layer.units, bias=layer.use_bias, batch_first=True, dtype=dtype,
                 **kwargs)
    own = dict(module.named_parameters())
    if own.keys() != parameters.keys():
        # A subclass with parameters Keras has no value for (e.g. layer-norm gains) would silently keep its
        # initial values; refuse instead.
        raise TypeError(f"{cls.__name__}.from_keras: the module's parameters {sorted(own)} are not those "
                        f"of a Keras {expected.__name__} layer {sorted(parameters)}")
    with torch.no_grad():
        for name, value in parameters.items():
            own[name].copy_(value)
    return module


def _check_layer(owner: str, layer, keras) -> None:
    """Refuses Keras options the fused kernels do not compute, naming the option."""
    name = f"{owner}.from_keras: Keras layer {layer.name!r}"
    if not layer.built:
        raise ValueError(f"{name} is not built, so it has no weights yet: call it on an input, or "
                         f"layer.build((None, None, input_size)), first")
    if layer.activation is not keras.activations.tanh:
        raise ValueError(f"{name} has activation={_function_name(layer.activation)}; "
                         f"genfast's fused cells compute activation='tanh' only")
    if layer.recurrent_activation is not keras.activations.sigmoid:
        raise ValueError(f"{name} has recurrent_activation={_function_name(layer.recurrent_activation)}; "
                         f"genfast's fused cells compute recurrent_activation='sigmoid' only")
    if layer.go_backwards:
        raise ValueError(f"{name} has go_backwards=True, which genfast's modules do not have (Keras reads the "
                         f"sequence reversed and returns the outputs in reversed order)")
    if layer.stateful:
        raise ValueError(f"{name} has stateful=True; genfast's modules keep no state between calls "
                         f"(pass the states as hx instead)")
    if layer.dropout > 0:
        raise ValueError(f"{name} has dropout={layer.dropout}: Keras drops the inputs of each gate with "
                         f"masks of its own, which genfast's modules do not compute")
    if layer.recurrent_dropout > 0:
        raise ValueError(f"{name} has recurrent_dropout={layer.recurrent_dropout}, which this converter "
                         f"does not map to genfast")


def _function_name(function) -> str:
    return getattr(function, "__name__", repr(function))


def _array(variable) -> torch.Tensor:
    """A Keras variable's value as a CPU tensor: float64 stays, anything else becomes float32 (exactly)."""
    import keras

    value = keras.ops.convert_to_numpy(variable)
    value = value.astype(np.float64 if value.dtype == np.float64 else np.float32)
    return torch.from_numpy(np.ascontiguousarray(value))


def _lstm_parameters(layer):
    cell = layer.cell
    parameters = {"weight_ih_l0": _array(cell.kernel).t(), "weight_hh_l0": _array(cell.recurrent_kernel).t()}
    if layer.use_bias:
        bias = _array(cell.bias)
        parameters.update(bias_ih_l0=bias, bias_hh_l0=torch.zeros_like(bias))
    return {}, parameters


def _keras_to_torch_gru_gates(t: torch.Tensor) -> torch.Tensor:
    """Keras' GRU gate blocks (z, r, h) along the last axis, reordered to torch's (r, z, n)."""
    z, r, h = t.chunk(3, dim=-1)
    return torch.cat([r, z, h], dim=-1)


def _gru_parameters(layer):
    cell = layer.cell
    parameters = {"weight_ih_l0": _keras_to_torch_gru_gates(_array(cell.kernel)).t(),
                  "weight_hh_l0": _keras_to_torch_gru_gates(_array(cell.recurrent_kernel)).t()}
    if layer.use_bias:
        bias = _keras_to_torch_gru_gates(_array(cell.bias))
        if cell.reset_after:
            parameters.update(bias_ih_l0=bias[0], bias_hh_l0=bias[1])
        else:
            parameters.update(bias_ih_l0=bias, bias_hh_l0=torch.zeros_like(bias))
    return ({} if cell.reset_after else {"reset_after": False}), parameters
