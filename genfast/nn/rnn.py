"""Drop-in replacements for torch.nn.LSTM, GRU, LSTMCell and GRUCell.

Same constructor, parameter names, initialisation, state_dict, forward signature and
outputs as torch.nn; the work runs in genfast's fused kernels:

    LSTM.forward -> genfast.ops.rnn.lstm (one call per layer and direction)
                 -> torch.ops.genfast.lstm_forward -> csrc/cpu/rnn.cpp -> csrc/rnn/cells.h

On CUDA, shapes at which the CUDA kernels measured slower than cuDNN run torch's own LSTM/GRU on the
same weights instead (genfast.routing's rules; genfast.routing.last_dispatch("rnn") says which ran).

The modules derive from torch.nn.RNNBase / RNNCellBase for their parameters and
argument checks, but are not torch.nn.LSTM/GRU subclasses: torch.compile graph-breaks
on those, and captures these whole.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from genfast import _extension, ops, routing

__all__ = ["LSTM", "GRU", "LSTMCell", "GRUCell", "replace_rnns"]


def _check_backend(input: Tensor) -> None:
    if input.is_cuda and not _extension.load().cuda_built():
        raise RuntimeError(
            "genfast was built without its CUDA kernels (the installed torch had no CUDA, or CUDA_HOME was "
            "unset), so it cannot run on a CUDA tensor; rebuild with a CUDA torch, or use torch.nn on the GPU")


def _apply_permutation(tensor: Tensor, permutation: Tensor | None, dim: int = 1) -> Tensor:
    return tensor if permutation is None else tensor.index_select(dim, permutation)


class _FusedRNNBase(torch.nn.RNNBase):
    """The layer/direction loop shared by LSTM and GRU; subclasses run one layer."""

    def _run_layers(self, input: Tensor, states: list[Tensor], batch_sizes: Tensor | None):
        """states: per state kind, a (layers*directions, N, *) tensor. Returns output and final states."""
        if input.is_cuda and self._routed_to_torch(input, states, batch_sizes):
            return self._run_torch(input, states, batch_sizes)
        directions = 2 if self.bidirectional else 1
        initial = [s.unbind(0) for s in states]  # per state kind, one (N, *) view per layer and direction
        final: list[list[Tensor]] = [[] for _ in states]
        layer_input = input
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                output, *last = self._layer(layer_input, [s[index] for s in initial], self._layer_weights(index),
                                            batch_sizes, direction == 1)
                outputs.append(output)
                for kind, value in enumerate(last):
                    final[kind].append(value)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        return layer_input, [f[0].unsqueeze(0) if len(f) == 1 else torch.stack(f) for f in final]

    def _routed_to_torch(self, input: Tensor, states: list[Tensor], batch_sizes: Tensor | None) -> bool:
        """Whether genfast.routing sends this CUDA call to torch's own LSTM/GRU (cuDNN). Only genfast's LSTM
        and GRU themselves (a subclass with another cell has no torch equivalent), and only calls whose weights
        and states match the input's dtype and device: the kernels raise genfast's errors for the others."""
        weight = self._flat_weights[0]  # the device is the caller's to check (_run_layers: CUDA inputs)
        if (type(self) not in (LSTM, GRU) or weight.dtype != input.dtype or weight.device != input.device
                or any(s.dtype != input.dtype or s.device != input.device for s in states)):
            return False
        steps, batch = (len(batch_sizes), int(batch_sizes[0])) if batch_sizes is not None else input.shape[:2]
        return routing.route("rnn", "cuda", input.dtype, "genfast-cuda", cell=self.mode.lower(), steps=steps,
                             batch=batch) is not None

    def _run_torch(self, input: Tensor, states: list[Tensor], batch_sizes: Tensor | None):
        """torch.nn.LSTM/GRU's own computation (torch._VF.lstm / gru, cuDNN on CUDA) on this module's weights
        (RNNBase's _flat_weights, as torch.nn.LSTM passes them): the same forward and backward as torch.nn."""
        vf = torch._VF.lstm if self.mode == "LSTM" else torch._VF.gru
        hx = tuple(states) if self.mode == "LSTM" else states[0]
        args = (self._flat_weights, self.bias, self.num_layers, self.dropout, self.training, self.bidirectional)
        result = vf(input, hx, *args, False) if batch_sizes is None else vf(input, batch_sizes, hx, *args)
        return result[0], list(result[1:])

    def _layer_weights(self, index: int):
        """(w_ih, w_hh, b_ih, b_hh, w_hr) of layer-and-direction ``index`` (None where absent).

        Read from RNNBase's ``_flat_weights``, the list torch.nn.LSTM's own forward reads (kept current
        when a weight is reassigned or the module moved): it is cheaper than four getattr calls, which
        matter in a one-token decode step.
        """
        per_layer = len(self._flat_weights) // (self.num_layers * (2 if self.bidirectional else 1))
        group = self._flat_weights[index * per_layer:(index + 1) * per_layer]
        b_ih, b_hh = (group[2], group[3]) if self.bias else (None, None)
        w_hr = group[-1] if getattr(self, "proj_size", 0) > 0 else None
        return group[0], group[1], b_ih, b_hh, w_hr

    def _prepare(self, input, hx, state_shapes):
        """Unpacks PackedSequence / batch_first / unbatched input and makes default states.

        Returns (input (T, N, I) or packed data, list of states, batch_sizes, sorted, unsorted, unbatched).
        """
        _check_backend(input.data if isinstance(input, PackedSequence) else input)
        if isinstance(input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            batch = int(batch_sizes[0])
            unbatched = False
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                raise ValueError(f"{type(self).__name__}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            unbatched = input.dim() == 2
            if unbatched:
                input = input.unsqueeze(1)
            elif self.batch_first:
                input = input.transpose(0, 1)
            batch = input.size(1)
        if hx is None:
            states = [torch.zeros(self.num_layers * (2 if self.bidirectional else 1), batch, size,
                                  dtype=input.dtype, device=input.device) for size in state_shapes]
        else:
            states = list(hx) if isinstance(hx, (tuple, list)) else [hx]
            if unbatched:
                for s in states:
                    if s.dim() != 2:
                        raise RuntimeError(
                            f"For unbatched 2-D input, hx should also be 2-D but got {s.dim()}-D tensor")
                states = [s.unsqueeze(1) for s in states]
            else:
                for s in states:
                    if s.dim() != 3:
                        raise RuntimeError(
                            f"For batched 3-D input, hx should also be 3-D but got {s.dim()}-D tensor")
            states = [_apply_permutation(s, sorted_indices) for s in states]
        self.check_input(input, batch_sizes)
        expected = lambda size: (self.num_layers * (2 if self.bidirectional else 1), batch, size)
        for s, size in zip(states, state_shapes):
            self.check_hidden_size(s, expected(size))
        if batch == 0:
            raise ValueError(f"{type(self).__name__}: input has an empty batch (batch size 0)")
        if input.size(0) == 0:
            raise ValueError(f"{type(self).__name__}: input has sequence length 0")
        return input, states, batch_sizes, sorted_indices, unsorted_indices, unbatched

    def _finish(self, output, states, batch_sizes, sorted_indices, unsorted_indices, unbatched):
        states = [_apply_permutation(s, unsorted_indices) for s in states]
        if batch_sizes is not None:
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), states
        if unbatched:
            return output.squeeze(1), [s.squeeze(1) for s in states]
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, states

    @classmethod
    def from_torch(cls, module: torch.nn.RNNBase):
        """A genfast copy of a torch.nn module: same configuration, same weights (copied)."""
        kwargs = dict(input_size=module.input_size, hidden_size=module.hidden_size, num_layers=module.num_layers,
                      bias=module.bias, batch_first=module.batch_first, dropout=module.dropout,
                      bidirectional=module.bidirectional)
        if getattr(module, "proj_size", 0):
            kwargs["proj_size"] = module.proj_size
        weight = next(module.parameters())
        new = cls(**kwargs, device=weight.device, dtype=weight.dtype)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new

    @classmethod
    def from_keras(cls, layer):
        """A genfast copy of a built Keras 3 ``keras.layers.LSTM`` / ``GRU``, with ``batch_first=True``.

        Its output is what Keras returns with ``return_sequences=True`` and its final states are Keras'
        (with torch's leading layer axis). Weight layout and refused options: genfast/nn/keras_interop.py.
        """
        from genfast.nn.keras_interop import from_keras
        return from_keras(cls, layer)


class _RegularizedRNN:
    """The regularisers of the recurrent modules (mixed in before _FusedRNNBase). Rates, 0 = off:

    - ``zoneout=p``: training, h_t = m * h_{t-1} + (1 - m) * h~_t with m ~ Bernoulli(p) per row, unit and
      step; eval, h_t = p * h_{t-1} + (1 - p) * h~_t. ``cell_zoneout`` the same for the LSTM's c (own mask).
    - ``recurrent_dropout=p``: training, h_{t-1} times one Bernoulli(1 - p) / (1 - p) mask per row and
      unit (per forward call, layer and direction) where it enters the recurrent product W_hh h_{t-1};
      the carried state is not masked. GRU(reset_after=False): W_hr and W_hz read m * h_{t-1}, W_hn reads
      r * (m * h_{t-1}), and z * h_{t-1} keeps the carried h.
    - ``weight_dropout=p``: training, W_hh times one Bernoulli(1 - p) / (1 - p) mask per forward call,
      layer and direction (DropConnect).

    The masks come from torch's default generator of the device (torch.manual_seed reproduces a run),
    as 16-bit uniforms: a probability p acts as p rounded to a multiple of 2^-16.
    Zoneout and recurrent dropout run inside the fused kernels (genfast.ops.rnn: the masks as tensors);
    weight dropout is a plain torch op on W_hh before the call.
    """

    _REGULARIZERS = ("zoneout", "cell_zoneout", "recurrent_dropout", "weight_dropout")

    def _set_regularizers(self, **rates: float) -> None:
        for name, p in rates.items():
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
                raise ValueError(f"{type(self).__name__}: {name} must be a number in [0, 1], got {p!r}")
            setattr(self, name, float(p))
        for name in self._REGULARIZERS:
            if name not in rates:
                setattr(self, name, 0.0)
        if getattr(self, "proj_size", 0) > 0 and (self.zoneout or self.cell_zoneout or self.recurrent_dropout):
            raise ValueError(f"{type(self).__name__}: zoneout, cell_zoneout and recurrent_dropout are not supported "
                             "with proj_size > 0")

    def _regularizers_active(self) -> bool:
        if self.training:
            return bool(self.zoneout or self.cell_zoneout or self.recurrent_dropout or self.weight_dropout)
        return bool(self.zoneout or self.cell_zoneout)  # eval: zoneout's expectation; the dropouts are off

    def _regularize(self, input: Tensor, batch_sizes: Tensor | None, states: list[Tensor], w_hh: Tensor):
        """W_hh after weight dropout, and the ops' mask arguments, for one layer and direction."""
        rows = input.shape[0] if batch_sizes is not None else input.shape[0] * input.shape[1]
        like = dict(dtype=input.dtype, device=input.device)
        masks = {}
        for name, state in (("zoneout", 0), ("cell_zoneout", 1)):
            p = getattr(self, name)
            if p > 0 and state < len(states):
                shape = (rows, states[state].shape[-1])
                masks[name] = _bernoulli(shape, p, like) if self.training else torch.full(shape, p, **like)
        if self.training and self.recurrent_dropout > 0:
            masks["recurrent_mask"] = _dropout_mask(states[0].shape, self.recurrent_dropout, like)
        if self.training and self.weight_dropout > 0:
            w_hh = w_hh * _dropout_mask(w_hh.shape, self.weight_dropout, like)
        return w_hh, masks

    def extra_repr(self) -> str:
        rates = ", ".join(f"{name}={getattr(self, name)}" for name in self._REGULARIZERS if getattr(self, name, 0))
        return super().extra_repr() + (", " + rates if rates else "")


def _uniform16(shape, device) -> Tensor:
    """Uniform int16 values of ``shape`` from the device's default generator: four per 64-bit draw, the
    draws being what a mask costs on the CPU (torch.rand draws one 32-bit value per element, ~3x the
    time; Tensor.bernoulli_ ~10x)."""
    n = math.prod(shape)
    bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    return bits.view(torch.int16)[:n].view(shape)


def _below(u: Tensor, p: float, dtype: torch.dtype) -> Tensor:
    """1 where u < t, else 0, in ``dtype``, with P(u < t) = p to 2^-16 for u uniform over int16. Computed as
    t - u clamped to [0, 1], exact because both are integers (float32 holds them): on the CPU ~5x faster than
    a comparison and a bool-to-float conversion, which cost more than the random draw itself."""
    t = round(p * 65536) - 32768
    exact = torch.float64 if dtype == torch.float64 else torch.float32
    below = u.to(exact).neg_().add_(t).clamp_(0, 1)
    return below if dtype == exact else below.to(dtype)


def _bernoulli(shape, p: float, like: dict) -> Tensor:
    """1 with probability p (to 2^-16), else 0."""
    return _below(_uniform16(shape, like["device"]), p, like["dtype"])


def _dropout_mask(shape, p: float, like: dict) -> Tensor:
    """Bernoulli(1 - p) / (1 - p) of ``shape`` (all zeros at p = 1, as F.dropout)."""
    if p >= 1.0:
        return torch.zeros(shape, **like)
    return _below(_uniform16(shape, like["device"]), p, like["dtype"]).neg_().add_(1).div_(1.0 - p)


class LSTM(_RegularizedRNN, _FusedRNNBase):
    """torch.nn.LSTM, computed by genfast's fused LSTM kernels. See torch.nn.LSTM for the API.

    Beyond torch's arguments, the regularisers (keyword arguments, 0 = off; see _RegularizedRNN):
    ``zoneout``, ``cell_zoneout``, ``recurrent_dropout``, ``weight_dropout``.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *, zoneout: float = 0.0, cell_zoneout: float = 0.0,
                 recurrent_dropout: float = 0.0, weight_dropout: float = 0.0) -> None:
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device=device, dtype=dtype)
        self._set_regularizers(zoneout=zoneout, cell_zoneout=cell_zoneout, recurrent_dropout=recurrent_dropout,
                               weight_dropout=weight_dropout)

    def _layer(self, input, states, weights, batch_sizes, reverse):
        w_ih, w_hh, b_ih, b_hh, w_hr = weights
        if self._regularizers_active():
            w_hh, masks = self._regularize(input, batch_sizes, states, w_hh)
            return ops.lstm(input, states[0], states[1], w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, **masks)
        return ops.lstm(input, states[0], states[1], w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse)

    def forward(self, input, hx: tuple[Tensor, Tensor] | None = None):
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        if hx is not None and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError("LSTM: hx must be a tuple (h_0, c_0)")
        input, states, batch_sizes, sorted_i, unsorted_i, unbatched = self._prepare(
            input, hx, (out_size, self.hidden_size))
        output, states = self._run_layers(input, states, batch_sizes)
        output, (h_n, c_n) = self._finish(output, states, batch_sizes, sorted_i, unsorted_i, unbatched)
        return output, (h_n, c_n)


class GRU(_RegularizedRNN, _FusedRNNBase):
    """torch.nn.GRU, computed by genfast's fused GRU kernels. See torch.nn.GRU for the API.

    ``reset_after=False`` applies the reset gate before the recurrent product of the new gate,
    n = tanh(W_in x + b_in + W_hn (r * h) + b_hn), as Cho et al.'s GRU and Keras' ``reset_after=False``;
    the other equations, the parameters and the state_dict stay torch.nn.GRU's.

    Beyond torch's arguments, the regularisers (keyword arguments, 0 = off; see _RegularizedRNN):
    ``zoneout``, ``recurrent_dropout``, ``weight_dropout``.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, reset_after: bool = True, zoneout: float = 0.0,
                 recurrent_dropout: float = 0.0, weight_dropout: float = 0.0) -> None:
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype)
        self.reset_after = reset_after
        self._set_regularizers(zoneout=zoneout, recurrent_dropout=recurrent_dropout, weight_dropout=weight_dropout)

    def _layer(self, input, states, weights, batch_sizes, reverse):
        w_ih, w_hh, b_ih, b_hh, _ = weights
        if not self.reset_after:
            if self._regularizers_active():
                w_hh, masks = self._regularize(input, batch_sizes, states, w_hh)
                return ops.gru_reset_before(input, states[0], w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, **masks)
            return ops.gru_reset_before(input, states[0], w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
        if self._regularizers_active():
            w_hh, masks = self._regularize(input, batch_sizes, states, w_hh)
            return ops.gru(input, states[0], w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, **masks)
        return ops.gru(input, states[0], w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.reset_after else ", reset_after=False")

    @classmethod
    def from_torch(cls, module: torch.nn.RNNBase):
        """As _FusedRNNBase.from_torch; a module with a ``reset_after`` attribute keeps it."""
        new = super().from_torch(module)
        new.reset_after = getattr(module, "reset_after", new.reset_after)
        return new

    def forward(self, input, hx: Tensor | None = None):
        input, states, batch_sizes, sorted_i, unsorted_i, unbatched = self._prepare(input, hx, (self.hidden_size,))
        output, states = self._run_layers(input, states, batch_sizes)
        output, (h_n,) = self._finish(output, states, batch_sizes, sorted_i, unsorted_i, unbatched)
        return output, h_n


class _FusedCellBase(torch.nn.RNNCellBase):
    def _prepare(self, input: Tensor, hx, n_states: int):
        _check_backend(input)
        if input.dim() not in (1, 2):
            raise ValueError(f"{type(self).__name__}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if input.size(-1) != self.input_size:
            raise RuntimeError(
                f"{type(self).__name__}: input has inconsistent input_size: got {input.size(-1)} "
                f"expected {self.input_size}")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        if input.size(0) == 0:
            raise ValueError(f"{type(self).__name__}: input has an empty batch (batch size 0)")
        if hx is None:
            states = [input.new_zeros(input.size(0), self.hidden_size) for _ in range(n_states)]
        else:
            states = list(hx) if n_states > 1 else [hx]
            for s in states:
                if s.dim() != (2 if batched else 1):
                    raise RuntimeError(
                        f"{type(self).__name__}: Expected hidden to be {2 if batched else 1}D for "
                        f"{2 if batched else 1}D input, got {s.dim()}D instead")
            if not batched:
                states = [s.unsqueeze(0) for s in states]
            for s in states:
                if s.shape != (input.size(0), self.hidden_size):
                    raise RuntimeError(
                        f"{type(self).__name__}: hidden state has shape {tuple(s.shape)}, expected "
                        f"{(input.size(0), self.hidden_size)}")
        # The fused sequence kernel, one step long (T = 1).
        return input.unsqueeze(0), states, batched

    @classmethod
    def from_torch(cls, module: torch.nn.RNNCellBase):
        weight = module.weight_ih
        new = cls(module.input_size, module.hidden_size, module.bias, device=weight.device, dtype=weight.dtype)
        new.load_state_dict(module.state_dict())
        return new


class LSTMCell(_FusedCellBase):
    """torch.nn.LSTMCell on genfast's fused LSTM step. See torch.nn.LSTMCell for the API."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        x, (h, c), batched = self._prepare(input, hx, 2)
        _, h, c = ops.lstm(x, h, c, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class GRUCell(_FusedCellBase):
    """torch.nn.GRUCell on genfast's fused GRU step. See torch.nn.GRUCell for the API, and GRU for
    ``reset_after``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 reset_after: bool = True) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype)
        self.reset_after = reset_after

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        x, (h,), batched = self._prepare(input, hx, 1)
        layer = ops.gru if self.reset_after else ops.rnn.gru_reset_before
        _, h = layer(x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return h if batched else h.squeeze(0)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.reset_after else ", reset_after=False")

    @classmethod
    def from_torch(cls, module: torch.nn.RNNCellBase):
        """As _FusedCellBase.from_torch; a module with a ``reset_after`` attribute keeps it."""
        new = super().from_torch(module)
        new.reset_after = getattr(module, "reset_after", new.reset_after)
        return new


_REPLACEMENTS = {torch.nn.LSTM: LSTM, torch.nn.GRU: GRU, torch.nn.LSTMCell: LSTMCell, torch.nn.GRUCell: GRUCell}


def replace_rnns(model: torch.nn.Module) -> torch.nn.Module:
    """Swaps every torch.nn LSTM/GRU/LSTMCell/GRUCell inside ``model`` (in place) for genfast's, keeping weights.

    Returns the model (or the replacement, if ``model`` itself is one of those modules).
    """
    if type(model) in _REPLACEMENTS:
        return _REPLACEMENTS[type(model)].from_torch(model)
    for name, child in model.named_children():
        replacement = _REPLACEMENTS.get(type(child))
        if replacement is not None:
            setattr(model, name, replacement.from_torch(child))
        else:
            replace_rnns(child)
    return model
