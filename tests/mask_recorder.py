"""Records the regularisers' masks that genfast.nn's recurrent modules draw, so module-level tests can hand
the same masks to the reference."""
from __future__ import annotations

import genfast.nn.rnn as gnn_rnn


class MaskRecorder:
    """Wraps the ops `namespace.<op_names>` that a module calls and genfast.nn.rnn._dropout_mask: `calls` holds
    each op call's keyword arguments that are not None (the mask arguments per layer call), `dropout_masks`
    every Bernoulli(1 - p) / (1 - p) mask drawn, in order (recurrent dropout, then weight dropout, per call)."""

    def __init__(self, monkeypatch, namespace, op_names):
        self.calls, self.dropout_masks = [], []
        real_mask = gnn_rnn._dropout_mask

        def record(real):
            def wrapped(*args, **kwargs):
                self.calls.append({k: v for k, v in kwargs.items() if v is not None})
                return real(*args, **kwargs)
            return wrapped

        def mask(shape, p, like):
            m = real_mask(shape, p, like)
            self.dropout_masks.append(m)
            return m

        for name in op_names:
            monkeypatch.setattr(namespace, name, record(getattr(namespace, name)))
        monkeypatch.setattr(gnn_rnn, "_dropout_mask", mask)
