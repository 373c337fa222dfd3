"""The sentence VAE (genfast.vae): the ELBO against a plain-PyTorch reference on the same weights,
the KL annealing schedule, training, reproducible sampling, interpolation, checkpoints and the CLI."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import genfast.vae
from genfast.generation.vae import (END, PAD, START, Batches, CheckpointError, CorpusError, SentenceVAE,
                                    TrainSettings, Vocabulary, kl_annealing, load_checkpoint, read_sentences,
                                    save_checkpoint, train, with_torch_rnns)

SMALL = dict(embedding_dim=8, hidden_size=16, latent_size=4)


@pytest.fixture
def one_thread():
    # A model this small gains nothing from a second thread, and on a loaded machine a thread team
    # waiting at every step's barrier for a descheduled member can cost 100x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(cell="gru", num_layers=1, word_dropout=0.25, vocab_size=23, seed=0, **sizes):
    torch.manual_seed(seed)
    return SentenceVAE(vocab_size, num_layers=num_layers, word_dropout=word_dropout, cell=cell, **{**SMALL, **sizes})


def random_batch(n=5, vocab_size=23, longest=9, seed=1):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, longest + 1, (n,), generator=generator).tolist()
    lengths[0] = longest  # the longest sentence sets T
    return [torch.randint(3, vocab_size, (length,), generator=generator) for length in lengths]


# --------------------------------------------------------------------------- reference
def _torch_rnn(model: SentenceVAE, name: str) -> nn.RNNBase:
    """torch.nn.GRU / LSTM holding the model's encoder or decoder weights (its state_dict entries)."""
    rnn = getattr(model, name)
    cls = nn.GRU if model.config.cell == "gru" else nn.LSTM
    module = cls(rnn.input_size, rnn.hidden_size, rnn.num_layers).double()
    module.load_state_dict({k.removeprefix(name + "."): v.double() for k, v in model.state_dict().items()
                            if k.startswith(name + ".")})
    return module


def reference_elbo(model: SentenceVAE, batch, eps, drop):
    """Bowman et al.'s ELBO in float64, one sentence at a time through torch.nn.GRU / LSTM (no
    packing), from the model's weights: eps (N, latent) and drop (T, N) bool (decoder input words
    replaced by padding) as drawn by the model. Returns (loss, reconstruction, kl) and the
    parameters by the model's names (to compare gradients)."""
    params = {k: v.detach().double().requires_grad_() for k, v in model.named_parameters()}
    modules = {name: _torch_rnn(model, name) for name in ("encoder", "decoder")}

    def rnn(name, *args):  # the torch module run on the leaves above, so gradients land there
        weights = {k.removeprefix(name + "."): v for k, v in params.items() if k.startswith(name + ".")}
        return torch.func.functional_call(modules[name], weights, args)

    layers, hidden, lstm = model.config.num_layers, model.config.hidden_size, model.config.cell == "lstm"
    linear = lambda x, name: x @ params[f"{name}.weight"].T + params[f"{name}.bias"]
    embed = lambda ids: params["embedding.weight"][ids]
    reconstruction, kl = 0.0, 0.0
    for n, sentence in enumerate(batch):
        x = embed(torch.cat([sentence, torch.tensor([END])]))[:, None]          # (T, 1, E)
        _, state = rnn("encoder", x)
        h_last = (state[0] if lstm else state)[-1, 0]
        mu, logvar = linear(h_last, "to_mu"), linear(h_last, "to_logvar")
        z = mu + torch.exp(0.5 * logvar) * eps[n].double()
        initial = torch.tanh(linear(z, "to_initial")).view(2 if lstm else 1, layers, 1, hidden)
        state0 = (initial[0], initial[1]) if lstm else initial[0]
        inputs = torch.cat([torch.tensor([START]), sentence])
        inputs = torch.where(drop[:inputs.numel(), n], torch.full_like(inputs, PAD), inputs)
        steps = torch.cat([embed(inputs), z.expand(inputs.numel(), -1)], dim=-1)[:, None]
        out, _ = rnn("decoder", steps, state0)
        log_probs = torch.log_softmax(linear(out[:, 0], "head"), dim=-1)
        targets = torch.cat([sentence, torch.tensor([END])])
        reconstruction = reconstruction - log_probs[torch.arange(targets.numel()), targets].sum()
        kl = kl + 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum()
    reconstruction, kl = reconstruction / len(batch), kl / len(batch)
    return (reconstruction + model.kl_weight * kl, reconstruction, kl), params


def _draws(model, batch, seed):
    """The eps and word-dropout mask elbo() draws from a generator seeded alike (its documented order)."""
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(len(batch), model.config.latent_size, generator=generator)
    T = max(s.numel() for s in batch) + 1
    if model.training and model.config.word_dropout > 0:
        drop = torch.rand(T, len(batch), generator=generator) < model.config.word_dropout
        drop[0] = False
    else:
        drop = torch.zeros(T, len(batch), dtype=torch.bool)
    return eps, drop


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("training", [False, True])
def test_elbo_terms_and_gradients_match_the_reference(cell, num_layers, training):
    model = make_model(cell, num_layers, word_dropout=0.4)
    model.train(training)
    model.kl_weight = 0.3
    batch = random_batch()
    loss, reconstruction, kl = model.elbo(batch, generator=torch.Generator().manual_seed(7))
    eps, drop = _draws(model, batch, 7)
    if training:
        assert drop[1:].any() and not drop.all()  # the mask replaces some words and keeps others
    (ref_loss, ref_reconstruction, ref_kl), ref_params = reference_elbo(model, batch, eps, drop)
    # float32 sums over ~50 tokens of log-probabilities of magnitude ~3 against float64.
    for ours, ref in ((loss, ref_loss), (reconstruction, ref_reconstruction), (kl, ref_kl)):
        torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    assert loss.item() == pytest.approx(reconstruction.item() + 0.3 * kl.item(), rel=1e-6)
    loss.backward()
    ref_loss.backward()
    for name, param in model.named_parameters():
        expected = ref_params[name].grad
        if name == "embedding.weight":
            assert param.grad[PAD].abs().max() == 0  # padding (dropped words) has a fixed zero embedding
            expected = expected.clone()
            expected[PAD] = 0
        torch.testing.assert_close(param.grad.double(), expected, rtol=1e-4, atol=1e-5, msg=name)


def test_reference_sees_word_dropout():
    # The check above could pass with a mask that does nothing: a different mask changes the loss.
    model = make_model(word_dropout=0.4).train()
    batch = random_batch()
    eps, drop = _draws(model, batch, 7)
    (with_drop, _, _), _ = reference_elbo(model, batch, eps, drop)
    (without, _, _), _ = reference_elbo(model, batch, eps, torch.zeros_like(drop))
    assert abs(with_drop.item() - without.item()) > 1e-3


def test_torch_rnn_twin_computes_the_same_elbo():
    model = make_model(num_layers=2).train()
    twin = with_torch_rnns(model)
    assert type(twin.encoder) is nn.GRU and type(twin.decoder) is nn.GRU
    batch = random_batch(n=7)
    ours = model.elbo(batch, torch.Generator().manual_seed(3))
    theirs = twin.elbo(batch, torch.Generator().manual_seed(3))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_kl_is_zero_at_the_prior_and_eval_has_no_word_dropout():
    model = make_model(word_dropout=1.0).eval()
    with torch.no_grad():
        for name in ("to_mu", "to_logvar"):
            getattr(model, name).weight.zero_()
            getattr(model, name).bias.zero_()
    batch = random_batch()
    _, _, kl = model.elbo(batch)
    assert kl.item() == 0.0
    # eval: no words dropped, so two evaluations with the same eps agree whatever word_dropout is
    a = model.elbo(batch, torch.Generator().manual_seed(0))[1]
    b = make_model(word_dropout=0.0).eval()
    b.load_state_dict(model.state_dict())
    torch.testing.assert_close(a, b.elbo(batch, torch.Generator().manual_seed(0))[1])


def test_bad_batches_are_named():
    model = make_model()
    with pytest.raises(ValueError, match=r"batch\[1\].*outside \[3, 23\)"):
        model.elbo([torch.tensor([3, 4]), torch.tensor([2, 5])])
    with pytest.raises(ValueError, match=r"batch\[0\].*23"):
        model.encode([torch.tensor([23])])
    with pytest.raises(ValueError, match=r"batch\[0\] must be a 1-D LongTensor"):
        model.elbo([torch.tensor([[3, 4]])])
    with pytest.raises(ValueError, match="batch is empty"):
        model.elbo([])
    with pytest.raises(TypeError, match="list of 1-D LongTensors"):
        model.elbo(torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="vocab_size"):
        SentenceVAE(3)
    with pytest.raises(ValueError, match="cell"):
        SentenceVAE(10, cell="rnn")
    with pytest.raises(ValueError, match="word_dropout"):
        SentenceVAE(10, word_dropout=1.5)


# ---------------------------------------------------------------------------- annealing
def test_logistic_annealing_rises_from_near_zero_to_one_over_the_warmup():
    w = [kl_annealing(step, 1000) for step in range(0, 3001, 10)]
    assert w[0] == pytest.approx(1 / (1 + math.exp(5)))   # 0.0067
    assert kl_annealing(500, 1000) == pytest.approx(0.5)
    assert kl_annealing(1000, 1000) == pytest.approx(1 / (1 + math.exp(-5)))  # 0.9933
    assert all(0 < a < b <= 1 for a, b in zip(w, w[1:]))  # strictly increasing, never above 1
    assert w[-1] > 0.999999


def test_linear_and_constant_annealing_and_bad_settings():
    assert [kl_annealing(s, 4, "linear") for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert kl_annealing(0, 4, "constant") == 1.0
    with pytest.raises(ValueError, match="schedule"):
        kl_annealing(0, 4, "cosine")
    with pytest.raises(ValueError, match="warmup"):
        kl_annealing(0, 0)


def test_training_applies_the_schedule_to_the_loss(one_thread):
    seen = []
    model = make_model()
    data = random_batch(n=8, seed=5)
    original = model.elbo

    def spy(batch, generator=None):
        seen.append(model.kl_weight)
        return original(batch, generator)
    model.elbo = spy
    train(model, data, TrainSettings(steps=6, batch_size=4, kl_warmup=4, kl_schedule="linear"), progress=False)
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


# ----------------------------------------------------------------------------- training
SENTENCES = ["the cat sat on the mat .", "a dog ran in the park .", "the bird sang a song .",
             "my friend read the book .", "the sun is warm today .", "we walk to the river .",
             "she plays the old piano .", "the boat sails at dawn .", "he drinks hot tea .",
             "the children laugh and play ."]


def tiny_data():
    vocab = Vocabulary.build(SENTENCES, "word")
    return vocab, [vocab.encode(s) for s in SENTENCES]


def test_reconstruction_loss_falls_on_a_tiny_corpus(one_thread):
    vocab, data = tiny_data()
    torch.manual_seed(0)
    model = SentenceVAE(len(vocab), embedding_dim=16, hidden_size=32, latent_size=8, word_dropout=0.25)
    history = train(model, data, TrainSettings(steps=150, batch_size=5, lr=1e-2, kl_warmup=100), progress=False)
    first = sum(h[0] for h in history[:10]) / 10
    last = sum(h[0] for h in history[-10:]) / 10
    # 6-7 words + end over a 46-token vocabulary: ln 46 * 7.6 = 29 nats per sentence untrained; learnt to ~4.
    assert first > 20 and last < 0.5 * first, (first, last)
    assert history[-1][2] > 0.99  # the KL weight has reached ~1


def test_resume_retraces_the_uninterrupted_run(tmp_path, one_thread):
    vocab, data = tiny_data()
    settings = TrainSettings(steps=8, batch_size=3, lr=5e-3, kl_warmup=6, checkpoint_every=4)
    full = make_model(vocab_size=len(vocab))
    full_history = train(full, data, settings, checkpoint=tmp_path / "full.pt", vocab=vocab, progress=False)
    half = make_model(vocab_size=len(vocab))
    train(half, data, TrainSettings(**{**settings.__dict__, "steps": 4}), checkpoint=tmp_path / "half.pt",
          vocab=vocab, progress=False)
    resumed, loaded_vocab, ckpt = load_checkpoint(tmp_path / "half.pt")
    assert ckpt["step"] == 4 and loaded_vocab == vocab
    rest = train(resumed, data, settings, checkpoint=tmp_path / "half.pt", vocab=vocab, resume_from=ckpt,
                 progress=False)
    assert len(rest) == 4
    torch.testing.assert_close(torch.tensor(rest), torch.tensor(full_history[4:]), rtol=1e-5, atol=1e-5)


def test_batches_are_epochs_without_replacement():
    data = [torch.tensor([3 + i]) for i in range(10)]
    batches = Batches(data, 4, torch.Generator().manual_seed(0))
    first_epoch = [int(t) for _ in range(2) for t in batches.next()]
    assert len(set(first_epoch)) == 8  # no sentence twice before the epoch is used up
    with pytest.raises(CorpusError, match="10 sentences; at least the batch size \\(11\\)"):
        Batches(data, 11, torch.Generator())


# ----------------------------------------------------------------------- sampling
def test_sampling_is_reproducible_with_a_seed_and_uses_genfast_sampling(monkeypatch):
    model = make_model().eval()
    a = model.sample(4, max_len=12, temperature=0.9, top_k=8, generator=torch.Generator().manual_seed(1))
    b = model.sample(4, max_len=12, temperature=0.9, top_k=8, generator=torch.Generator().manual_seed(1))
    c = model.sample(4, max_len=12, temperature=0.9, top_k=8, generator=torch.Generator().manual_seed(2))
    assert a == b and a != c and len(a) == 4
    assert all(len(s) <= 12 and all(3 <= t < 23 for t in s) for s in a)
    # every token comes from genfast.generation.sampling.sample, with the caller's settings
    import genfast.generation.vae as vae_module

    calls = []
    real = vae_module.sample_tokens

    def spy(logits, temperature, top_k, top_p, generator=None):
        calls.append((temperature, top_k, top_p))
        assert torch.isinf(logits[:, :END]).all()  # padding and start can't be drawn
        return real(logits, temperature, top_k, top_p, generator=generator)
    monkeypatch.setattr(vae_module, "sample_tokens", spy)
    assert model.sample(4, max_len=12, temperature=0.9, top_k=8, generator=torch.Generator().manual_seed(1)) == a
    assert calls and set(calls) == {(0.9, 8, 1.0)}


def test_decode_stops_each_row_at_the_end_token():
    model = make_model().eval()
    with torch.no_grad():  # a head that always prefers END after token 5, and 5 otherwise
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[5] = 10.0
    assert model.decode(torch.zeros(2, 4), max_len=7, greedy=True) == [[5] * 7, [5] * 7]
    with torch.no_grad():
        model.head.bias[END] = 20.0
    assert model.decode(torch.zeros(2, 4), max_len=7, greedy=True) == [[], []]
    with pytest.raises(ValueError, match="max_len"):
        model.decode(torch.zeros(1, 4), max_len=0)
    with pytest.raises(ValueError, match="z must be"):
        model.decode(torch.zeros(1, 3))


def test_interpolate_decodes_the_line_between_the_posterior_means():
    model = make_model().eval()
    a, b = torch.tensor([3, 4, 5]), torch.tensor([9, 10])
    path = model.interpolate(a, b, steps=4, max_len=6)
    assert len(path) == 4
    mu, _ = model.encode([a, b])
    assert path[0] == model.decode(mu[:1], 6, greedy=True)[0]
    assert path[-1] == model.decode(mu[1:], 6, greedy=True)[0]
    middle = (mu[0] + mu[1]) / 2
    assert model.interpolate(a, b, steps=3, max_len=6)[1] == model.decode(middle[None], 6, greedy=True)[0]
    with pytest.raises(ValueError, match="steps"):
        model.interpolate(a, b, steps=1)
    with pytest.raises(ValueError, match=r"b\[0\]"):
        model.interpolate(a, torch.tensor([1]))


# ---------------------------------------------------------------------------- text
def test_vocabulary_word_and_char_levels():
    vocab = Vocabulary.build(["The cat, the hat.", "a cat"], "word", max_size=6)
    assert vocab.tokens == ["<pad>", "<s>", "</s>", "<unk>", "cat", "the"]  # most frequent first, ties by name
    ids = vocab.encode("the dog cat")
    assert ids.tolist() == [5, 3, 4]
    full = Vocabulary.build(["The cat, the hat.", "a (cat)"], "word")
    assert full.decode(full.encode("The cat, (the) cat.")) == "the cat, (the) cat."
    chars = Vocabulary.build(["abba"], "char")
    assert chars.tokens[4:] == ["a", "b"] and chars.decode(chars.encode("ab")) == "ab"
    assert chars.encode("abc").tolist() == [4, 5, 3]
    assert chars.decode([4, 3, 5]) == "a\ufffdb"  # <unk> is one character at the character level


def test_read_sentences_splits_long_lines_at_sentence_ends(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("short line here\n\nOne two three. Four five! Six seven eight nine ten eleven twelve?\n")
    assert read_sentences(path, "word", 5) == ["short line here", "One two three.", "Four five!"]
    assert read_sentences(path, "word", 20)[1].startswith("One two three. Four")  # short enough: kept whole
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(CorpusError, match="holds no sentence"):
        read_sentences(tmp_path / "empty.txt", "word", 5)
    with pytest.raises(CorpusError, match="does not exist"):
        read_sentences(tmp_path / "none.txt", "word", 5)


def test_checkpoint_that_is_not_ours_is_refused(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a genfast.vae checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"config": {}, "model": {}}, other)  # e.g. a char-RNN checkpoint
    with pytest.raises(CheckpointError, match="marker"):
        load_checkpoint(other)
    model = make_model()
    save_checkpoint(tmp_path / "ok.pt", model, None, None, 0, TrainSettings(), {})
    loaded, vocab, _ = load_checkpoint(tmp_path / "ok.pt")
    assert vocab is None and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_the_package_entry_exports_the_model():
    assert genfast.vae.SentenceVAE is SentenceVAE


# ------------------------------------------------------------------------------- CLI
def _cli(*args):
    """The command in a fresh process, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}  # see one_thread
    return subprocess.run([sys.executable, "-m", "genfast.vae", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _main(capsys, *args):
    """The command's main() in this process (each new process spends seconds importing torch):
    (exit code, stdout, stderr)."""
    from genfast.generation.vae_cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _assert_one_line_error(code, stderr, *fragments):
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_train_resume_sample_interpolate(tmp_path, capsys, one_thread):
    text = tmp_path / "s.txt"
    text.write_text("\n".join(SENTENCES) + "\n")
    ckpt = tmp_path / "v.pt"
    common = ["--text", str(text), "--checkpoint", str(ckpt), "--batch-size", "4", "--hidden-size", "16",
              "--embedding-dim", "8", "--latent-size", "4", "--checkpoint-every", "3", "--quiet"]
    code, _, err = _main(capsys, "train", *common, "--steps", "4")
    assert code == 0, err
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    code, _, err = _main(capsys, "train", *common, "--steps", "6", "--resume")
    assert code == 0, err
    assert "resuming from step 4" in err
    assert torch.load(ckpt, weights_only=True)["step"] == 6
    args = ["sample", "--checkpoint", str(ckpt), "--n", "3", "--temperature", "0.8", "--top-k", "5", "--seed", "3",
            "--max-len", "8"]
    code, first, err = _main(capsys, *args)
    assert code == 0, err
    assert len(first.splitlines()) == 3
    assert _main(capsys, *args)[1] == first
    code, out, err = _main(capsys, "interpolate", "--checkpoint", str(ckpt), "--a", "the cat sat", "--b",
                           "a dog ran .", "--steps", "4", "--max-len", "8")
    assert code == 0, err
    assert len(out.splitlines()) == 4
    # The same sampling from a fresh process, as `python -m genfast.vae`, prints the same lines.
    done = _cli(*args)
    assert done.returncode == 0, done.stderr
    assert done.stdout == first


def test_cli_char_level(tmp_path, capsys, one_thread):
    text = tmp_path / "s.txt"
    text.write_text("\n".join(SENTENCES) + "\n")
    ckpt = tmp_path / "c.pt"
    code, _, err = _main(capsys, "train", "--text", str(text), "--checkpoint", str(ckpt), "--level", "char",
                         "--batch-size", "4", "--hidden-size", "16", "--embedding-dim", "8", "--latent-size", "4",
                         "--steps", "2", "--quiet")
    assert code == 0, err
    model, vocab, ckpt_dict = load_checkpoint(ckpt)
    assert vocab.level == "char" and set(vocab.tokens[4:]) == set("".join(SENTENCES))
    assert ckpt_dict["settings"]["max_len"] == 120  # the char level's default
    code, out, err = _main(capsys, "sample", "--checkpoint", str(ckpt), "--n", "2", "--max-len", "10", "--seed", "0")
    assert code == 0, err
    lines = out.split("\n")[:2]
    assert all(len(line) <= 10 and set(line) <= set(vocab.tokens[4:]) | {"\ufffd"} for line in lines), out


def test_cli_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "none.txt"
    ckpt = str(tmp_path / "v.pt")
    _assert_one_line_error(*_main(capsys, "train", "--text", str(missing), "--checkpoint", ckpt)[::2],
                           "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _assert_one_line_error(*_main(capsys, "train", "--text", str(empty), "--checkpoint", ckpt)[::2],
                           "holds no sentence")
    small = tmp_path / "small.txt"
    small.write_text("one sentence .\nand another .\n")
    _assert_one_line_error(*_main(capsys, "train", "--text", str(small), "--checkpoint", ckpt)[::2],
                           "2 sentences", "batch size (32)")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00\x01 not a checkpoint")
    _assert_one_line_error(*_main(capsys, "interpolate", "--checkpoint", str(junk), "--a", "x", "--b", "y")[::2],
                           "not a genfast.vae checkpoint")
    _assert_one_line_error(*_main(capsys, "sample", "--checkpoint", str(tmp_path / "none.pt"))[::2],
                           "does not exist")
    _assert_one_line_error(*_main(capsys, "train", "--text", str(small), "--checkpoint", str(junk), "--resume")[::2],
                           "not a genfast.vae checkpoint")
    # From a fresh process too: exit status 2, one line, no traceback.
    done = _cli("sample", "--checkpoint", str(junk))
    _assert_one_line_error(done.returncode, done.stderr, "not a genfast.vae checkpoint")


# ---------------------------------------------------------------------------- benchmark
def test_benchmark_providers_take_the_same_step_from_the_same_weights():
    from genfast.bench import cases, providers
    from genfast.bench.vae import sentence_lengths

    case = cases.find("vae.tiny.training")
    work = providers.make_vae_workload(case, "cpu")
    assert [s.numel() for s in work.batch] == sentence_lengths(case.params)
    steps = {name: providers.PROVIDERS["vae"][name].build(work) for name in ("genfast", "torch")}
    first = {name: step() for name, step in steps.items()}   # (loss, reconstruction, kl) before the step
    torch.testing.assert_close(first["genfast"], first["torch"], rtol=1e-5, atol=1e-5)
    second = {name: step() for name, step in steps.items()}  # after one Adam step each: changed, still equal
    assert not torch.equal(first["genfast"], second["genfast"])
    torch.testing.assert_close(second["genfast"], second["torch"], rtol=1e-5, atol=1e-5)
    assert case.flops > 0
