"""Character-level LSTM/GRU LM: training, checkpoints, reproducible streaming, the CLI."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from genfast.generation.char_rnn import CharRNN, CharRNNConfig, TrainSettings, load_checkpoint, train

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 40
SMALL = dict(hidden_size=32, num_layers=2, embedding_dim=16)


def make_model(cell="lstm", seed=0):
    torch.manual_seed(seed)
    return CharRNN(CharRNNConfig(vocab="".join(sorted(set(TEXT))), cell=cell, **SMALL))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_loss_decreases(cell):
    model = make_model(cell)
    losses = train(model, TEXT, TrainSettings(steps=40, batch_size=8, seq_len=16, lr=1e-2), progress=False)
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # Uniform guessing over the 28 characters is ln 28 = 3.3; a repeated sentence is quickly learnt.
    assert last < 0.6 * first, (first, last)


def test_checkpoint_round_trip_and_resume_equals_uninterrupted(tmp_path):
    settings = TrainSettings(steps=10, batch_size=4, seq_len=16, lr=5e-3, checkpoint_every=5)
    # Uninterrupted run of 10 steps.
    full = make_model()
    full_losses = train(full, TEXT, settings, checkpoint=tmp_path / "full.pt", progress=False)
    # The same run stopped after 5 steps, then resumed from its checkpoint.
    half = make_model()
    train(half, TEXT, TrainSettings(**{**settings.__dict__, "steps": 5}), checkpoint=tmp_path / "half.pt",
          progress=False)
    resumed, ckpt = load_checkpoint(tmp_path / "half.pt")
    assert ckpt["step"] == 5
    rest = train(resumed, TEXT, settings, checkpoint=tmp_path / "half.pt", resume_from=ckpt, progress=False)
    assert len(rest) == 5
    # Same data order, same optimizer state: the resumed run retraces the uninterrupted one.
    torch.testing.assert_close(torch.tensor(rest), torch.tensor(full_losses[5:]), atol=1e-5, rtol=1e-5)
    loaded, _ = load_checkpoint(tmp_path / "full.pt")
    for (name, a), (_, b) in zip(full.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.config == full.config


def test_sampling_reproducible_with_seed_and_uses_one_step_per_character():
    model = make_model("gru").eval()
    calls = []
    hook = model.rnn.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    a = model.generate("the ", 30, temperature=0.9, top_k=5, generator=torch.Generator().manual_seed(1))
    hook.remove()
    b = model.generate("the ", 30, temperature=0.9, top_k=5, generator=torch.Generator().manual_seed(1))
    c = model.generate("the ", 30, temperature=0.9, top_k=5, generator=torch.Generator().manual_seed(2))
    assert a == b and a != c and len(a) == 30
    assert set(a) <= set(model.config.vocab)
    # The prompt once (T = 4), then T = 1 per new character (the last one needs no step).
    assert calls == [4] + [1] * 29


def test_stream_continues_the_state_like_a_full_pass():
    # Feeding characters one by one with the carried state equals one pass over the sequence.
    model = make_model().eval()
    ids = model.encode("over the lazy")[:, None]
    with torch.no_grad():
        full, _ = model(ids)
        state, steps = None, []
        for t in range(ids.shape[0]):
            out, state = model(ids[t:t + 1], state)
            steps.append(out)
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-5, rtol=1e-5)  # fp32, same kernels


def test_unknown_prompt_characters_are_named():
    with pytest.raises(ValueError, match="'Z'"):
        make_model().generate("Zebra", 3)


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "genfast.char_rnn", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_train_resume_sample_end_to_end(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text(TEXT)
    ckpt = tmp_path / "c.pt"
    common = ["--text", str(text), "--checkpoint", str(ckpt), "--batch-size", "4", "--seq-len", "16",
              "--hidden-size", "16", "--num-layers", "1", "--embedding-dim", "8", "--checkpoint-every", "3", "--quiet"]
    r = _cli("train", *common, "--steps", "4")
    assert r.returncode == 0, r.stderr
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    r = _cli("train", *common, "--steps", "6", "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming from step 4" in r.stderr
    assert torch.load(ckpt, weights_only=True)["step"] == 6
    args = ["sample", "--checkpoint", str(ckpt), "--prompt", "the", "--length", "20", "--temperature", "0.8",
            "--top-k", "5", "--seed", "3"]
    first, second = _cli(*args), _cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout.startswith("the") and len(first.stdout.rstrip("\n")) >= 23
    missing = _cli("sample", "--checkpoint", str(tmp_path / "none.pt"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
