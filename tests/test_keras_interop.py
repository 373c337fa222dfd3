"""genfast.nn.LSTM.from_keras / GRU.from_keras against real Keras 3 layers (torch backend, CPU).

Keras is the oracle: each test builds a Keras layer, gives it random weights (biases included, so a bias
mapped to the wrong gate fails), runs it on random input, and compares its sequence output and final states
with the converted genfast module's. Keras runs on the CPU (KERAS_TORCH_DEVICE=cpu) so that it computes in
plain float32 whatever machine the tests run on.

Tolerances: both sides compute in float32 and differ only in the summation order of the I- and H-long dot
products (genfast's blocked GEMM against torch.matmul in Keras' loop). Per step a gate pre-activation then
differs by at most about (I + H) * 2^-24 * max|summand|: 11 * 6e-8 * ~1.5 = 1e-6 for the layers here, and
320 * 6e-8 * 1/8 = 2.4e-6 in the IMDB model's first LSTM (I + H = 256 + 64, inputs and weights at most 1 and
1/8). The gate functions are 1-Lipschitz and the recurrent weights are small (U(+-1/sqrt(H)), torch's
initialisation), so the recurrence contracts: a step adds its own rounding rather than amplifying the past
one, and the outputs stay within a few per-step errors.
ATOL = 2e-5 leaves a factor of about 5 on that (measured: at most 2e-7). float64 layers get 1e-12 where Keras
itself computes in float64 (see test_float64_layer_gives_float64_module).
"""
from __future__ import annotations

import os

import pytest

os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported: Keras 3 on torch, no TensorFlow
os.environ["KERAS_TORCH_DEVICE"] = "cpu"
keras = pytest.importorskip("keras")

# Keras' own numpy conversions warn under numpy 2 (its __array__ takes no copy argument); not genfast's.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import genfast.nn as gnn  # noqa: E402

ATOL = 2e-5
ATOL_FLOAT64 = 1e-12
SHAPES = [(1, 1), (3, 7), (8, 20)]  # (batch, sequence length)
I, H = 5, 6

def test_keras_runs_on_torch():
    assert keras.backend.backend() == "torch", "KERAS_BACKEND must be torch (set before keras is imported)"


def randomize(layer, rng, scale):
    """Every weight of ``layer`` drawn from U(-scale, scale) (Keras initialises biases to 0 and 1)."""
    layer.set_weights([rng.uniform(-scale, scale, w.shape).astype(w.dtype) for w in layer.get_weights()])


def keras_layer(kind, rng, use_bias=True, dtype="float32", **options):
    """A built Keras LSTM, GRU (reset_after=True) or GRU (reset_after=False) with random weights."""
    if kind == "lstm":
        layer = keras.layers.LSTM(H, use_bias=use_bias, return_sequences=True, return_state=True, dtype=dtype,
                                  **options)
    else:
        layer = keras.layers.GRU(H, use_bias=use_bias, return_sequences=True, return_state=True, dtype=dtype,
                                 reset_after=kind == "gru", **options)
    layer.build((None, None, I))
    randomize(layer, rng, 1 / np.sqrt(H))
    return layer


def convert(kind, layer):
    return (gnn.LSTM if kind == "lstm" else gnn.GRU).from_keras(layer)


def run_keras(layer, x, initial_state=None):
    return [keras.ops.convert_to_numpy(t) for t in layer(x, initial_state=initial_state)]


def run_genfast(module, x, initial_state=None):
    """The module's output and final states in Keras' shapes: (N, T, H) and (N, H) per state."""
    hx = None
    if initial_state is not None:
        hx = [torch.from_numpy(s).unsqueeze(0) for s in initial_state]
        hx = tuple(hx) if len(hx) == 2 else hx[0]
    with torch.no_grad():
        output, states = module(torch.from_numpy(x), hx)
    states = states if isinstance(states, tuple) else (states,)
    return [output.numpy()] + [s.squeeze(0).numpy() for s in states]


def assert_matches_keras(actual, expected, atol):
    assert len(actual) == len(expected)
    for name, a, e in zip(["output", "h_n", "c_n"], actual, expected):
        assert a.shape == e.shape, name
        np.testing.assert_allclose(a, e, rtol=0, atol=atol, err_msg=name)


KINDS = ["lstm", "gru", "gru_reset_before"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("batch,steps", SHAPES)
@pytest.mark.parametrize("use_cudnn", ["auto", False])  # Keras' fused fallback loop / its generic cell loop
def test_matches_keras(kind, use_bias, batch, steps, use_cudnn):
    rng = np.random.default_rng([batch, steps, use_bias, use_cudnn is False])
    layer = keras_layer(kind, rng, use_bias, use_cudnn=use_cudnn)
    module = convert(kind, layer)
    assert module.batch_first and module.bias == use_bias
    assert next(module.parameters()).dtype == torch.float32
    x = rng.standard_normal((batch, steps, I)).astype(np.float32)
    assert_matches_keras(run_genfast(module, x), run_keras(layer, x), ATOL)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_keras_with_initial_states(kind):
    rng = np.random.default_rng(1)
    layer = keras_layer(kind, rng)
    x = rng.standard_normal((4, 9, I)).astype(np.float32)
    states = [rng.standard_normal((4, H)).astype(np.float32) for _ in range(2 if kind == "lstm" else 1)]
    assert_matches_keras(run_genfast(convert(kind, layer), x, states), run_keras(layer, x, states), ATOL)


@pytest.mark.parametrize("kind", KINDS)
def test_float64_layer_gives_float64_module(kind):
    rng = np.random.default_rng(2)
    layer = keras_layer(kind, rng, dtype="float64")
    module = convert(kind, layer)
    assert next(module.parameters()).dtype == torch.float64
    x = rng.standard_normal((3, 11, I))
    # Keras' generic cell loop, the only one it has for reset_after=False, multiplies in float32 even for
    # float64 layers on the torch backend (in Keras 3.15.1 keras.ops.matmul of two torch float64 tensors
    # returns float32), so there Keras is only float32-accurate. Its fused loops (LSTM, GRU reset_after=True)
    # stay in float64.
    atol = ATOL if kind == "gru_reset_before" else ATOL_FLOAT64
    assert_matches_keras(run_genfast(module, x), run_keras(layer, x), atol)


@pytest.mark.parametrize("kind", KINDS)
def test_return_sequences_false_is_the_last_output(kind):
    """Keras' default (return_sequences=False) returns the last step, which is the module's h_n."""
    rng = np.random.default_rng(3)
    layer = keras_layer(kind, rng)
    last = keras.layers.LSTM if kind == "lstm" else keras.layers.GRU
    last = last.from_config({**layer.get_config(), "return_sequences": False, "return_state": False})
    last.build((None, None, I))
    last.set_weights(layer.get_weights())
    x = rng.standard_normal((5, 6, I)).astype(np.float32)
    output, h_n, *_ = run_genfast(convert(kind, layer), x)
    np.testing.assert_allclose(h_n, keras.ops.convert_to_numpy(last(x)), rtol=0, atol=ATOL)
    np.testing.assert_array_equal(h_n, output[:, -1])


def test_weight_layout():
    """The mapping itself, on weights whose values name their Keras position (no float rounding involved)."""
    layer = keras.layers.GRU(2, reset_after=True)
    layer.build((None, None, 1))
    kernel, recurrent, bias = (np.arange(w.size, dtype=np.float32).reshape(w.shape) for w in layer.get_weights())
    layer.set_weights([kernel, recurrent, bias])
    module = gnn.GRU.from_keras(layer)
    z, r, n = slice(0, 2), slice(2, 4), slice(4, 6)  # Keras' gate columns
    torch_order = np.concatenate([kernel[:, r], kernel[:, z], kernel[:, n]], axis=1)
    np.testing.assert_array_equal(module.weight_ih_l0.detach().numpy(), torch_order.T)
    np.testing.assert_array_equal(module.bias_hh_l0.detach().numpy(),
                                  np.concatenate([bias[1, r], bias[1, z], bias[1, n]]))

    layer = keras.layers.LSTM(2)
    layer.build((None, None, 3))
    kernel, recurrent, bias = (np.arange(w.size, dtype=np.float32).reshape(w.shape) for w in layer.get_weights())
    layer.set_weights([kernel, recurrent, bias])
    module = gnn.LSTM.from_keras(layer)
    np.testing.assert_array_equal(module.weight_hh_l0.detach().numpy(), recurrent.T)
    np.testing.assert_array_equal(module.bias_ih_l0.detach().numpy(), bias)
    np.testing.assert_array_equal(module.bias_hh_l0.detach().numpy(), np.zeros_like(bias))


@pytest.mark.parametrize("options, message", [
    (dict(activation="relu"), "activation=relu"),
    (dict(recurrent_activation="hard_sigmoid"), "recurrent_activation=hard_sigmoid"),
    (dict(go_backwards=True), "go_backwards=True"),
    (dict(stateful=True), "stateful=True"),
    (dict(dropout=0.25), "dropout=0.25"),
    (dict(recurrent_dropout=0.25), "recurrent_dropout=0.25"),
])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_refuses_options_without_a_fused_equivalent(kind, options, message):
    cls = keras.layers.LSTM if kind == "lstm" else keras.layers.GRU
    layer = cls(H, **options)
    layer.build((2, 3, I))
    with pytest.raises(ValueError, match=message):
        convert(kind, layer)


def test_refuses_unbuilt_and_mismatched_layers():
    with pytest.raises(ValueError, match="not built"):
        gnn.LSTM.from_keras(keras.layers.LSTM(H))
    gru = keras.layers.GRU(H)
    gru.build((None, None, I))
    with pytest.raises(TypeError, match="expects a built keras.layers.LSTM, got .*GRU"):
        gnn.LSTM.from_keras(gru)
    with pytest.raises(TypeError, match="expects a built keras.layers.GRU"):
        gnn.GRU.from_keras(torch.nn.GRU(I, H))


# The seed document's IMDB sentiment model, Embedding(10000, 256) -> LSTM(64, return_sequences=True) ->
# LSTM(64) -> Dense(1, sigmoid), built in Keras and assembled again from genfast modules.
VOCABULARY, EMBEDDING, UNITS = 10000, 256, 64


class GenfastImdb(torch.nn.Module):
    """The IMDB model on genfast.nn, with the weights of a Keras one (the README's recipe)."""

    def __init__(self, model):
        super().__init__()
        embedding, lstm1, lstm2, dense = model.layers
        self.embedding = torch.nn.Embedding.from_pretrained(
            torch.from_numpy(keras.ops.convert_to_numpy(embedding.embeddings)), freeze=False)
        self.lstm1 = gnn.LSTM.from_keras(lstm1)
        self.lstm2 = gnn.LSTM.from_keras(lstm2)
        self.dense = torch.nn.Linear(UNITS, 1)
        kernel, bias = (torch.from_numpy(keras.ops.convert_to_numpy(w)) for w in (dense.kernel, dense.bias))
        with torch.no_grad():
            self.dense.weight.copy_(kernel.t())
            self.dense.bias.copy_(bias)

    def forward(self, token_ids):
        sequence, _ = self.lstm1(self.embedding(token_ids))
        _, (h_n, _) = self.lstm2(sequence)  # Keras' return_sequences=False output: the last h
        return torch.sigmoid(self.dense(h_n[-1]))


def test_imdb_model_predictions_match_keras():
    rng = np.random.default_rng(4)
    steps = 25
    model = keras.Sequential([
        keras.Input(shape=(steps,), dtype="int32"),
        keras.layers.Embedding(VOCABULARY, EMBEDDING),
        keras.layers.LSTM(UNITS, return_sequences=True),
        keras.layers.LSTM(UNITS),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    # Embedding rows of unit size; every other weight at torch's RNN scale, biases included.
    randomize(model.layers[0], rng, 1.0)
    for layer in model.layers[1:]:
        randomize(layer, rng, 1 / np.sqrt(UNITS))
    ids = rng.integers(0, VOCABULARY, (6, steps)).astype(np.int32)
    ids[0, :10] = 0  # pre-padding as keras.utils.pad_sequences makes it (no mask: both read the zeros)
    expected = keras.ops.convert_to_numpy(model.predict(ids, verbose=0))

    genfast_model = GenfastImdb(model)
    with torch.no_grad():
        actual = genfast_model(torch.from_numpy(ids).long()).numpy()
    assert actual.shape == expected.shape == (6, 1)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ATOL)
    # The predictions are not all the same value (a model that ignored its input would pass otherwise).
    assert np.ptp(expected) > 1e-3
