"""The sentence VAE of Bowman et al. (2016, "Generating Sentences from a Continuous Space") on
genfast's fused GRU / LSTM.

    model = SentenceVAE(vocab_size=len(vocab), hidden_size=256, latent_size=16)
    loss, reconstruction, kl = model.elbo([torch.tensor([5, 9, 4]), torch.tensor([7, 3])])
    model.sample(3, temperature=0.8, top_k=20)          # three id sequences from z ~ N(0, I)
    model.interpolate(a_ids, b_ids, steps=5)            # the decoded path between two sentences

    python -m genfast.vae train|sample|interpolate ...  (genfast/generation/vae_cli.py)

The model: an RNN encoder reads the sentence (embedded, followed by the end token) as one
PackedSequence; a linear layer of its last layer's final h gives mu and log sigma^2;
z = mu + sigma * eps. The decoder RNN starts from tanh(W z + b) (every layer's h, and the LSTM's c)
and sees z concatenated to the embedding of every input token; its inputs are the start token
and the sentence, its targets the sentence and the end token. Word dropout replaces decoder input
words (never the start token) by the padding id, whose embedding is fixed at zero, so the decoder
must lean on z to fill the gaps. The loss is reconstruction + kl_weight * KL(q(z|x) || N(0, I));
`kl_annealing` gives the weight over training (logistic or linear warm-up from 0 to 1).

Token ids 0, 1 and 2 are reserved for padding, start and end (PAD, START, END); sentences hold
ids >= 3. `Vocabulary` maps text to those ids (3 is <unk>) at the character or word level.
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_sequence

import genfast.nn as gnn
from genfast.generation.sampling import sample as sample_tokens

PAD, START, END = 0, 1, 2
FIRST_ID = 3  # the smallest id a sentence may hold


@dataclass
class VAEConfig:
    vocab_size: int
    embedding_dim: int = 256
    hidden_size: int = 512
    latent_size: int = 32
    num_layers: int = 1
    word_dropout: float = 0.25
    cell: str = "gru"

    def __post_init__(self):
        if self.cell not in ("gru", "lstm"):
            raise ValueError(f"cell must be 'gru' or 'lstm', got {self.cell!r}")
        if not isinstance(self.vocab_size, int) or self.vocab_size <= FIRST_ID:
            raise ValueError(f"vocab_size must be an int > {FIRST_ID} (ids 0, 1, 2 are reserved), "
                             f"got {self.vocab_size!r}")
        for name in ("embedding_dim", "hidden_size", "latent_size", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(self.word_dropout, (int, float)) and 0.0 <= self.word_dropout <= 1.0):
            raise ValueError(f"word_dropout must be in [0, 1], got {self.word_dropout!r}")


class SentenceVAE(nn.Module):
    """Bowman et al.'s sentence VAE; encoder and decoder are genfast.nn.GRU (or LSTM, cell="lstm")."""

    def __init__(self, vocab_size: int, embedding_dim: int = 256, hidden_size: int = 512, latent_size: int = 32,
                 num_layers: int = 1, word_dropout: float = 0.25, cell: str = "gru"):
        super().__init__()
        self.config = VAEConfig(vocab_size, embedding_dim, hidden_size, latent_size, num_layers, word_dropout, cell)
        rnn = gnn.GRU if cell == "gru" else gnn.LSTM
        self.states = 1 if cell == "gru" else 2  # h, or (h, c)
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=PAD)
        self.encoder = rnn(embedding_dim, hidden_size, num_layers)
        self.to_mu = nn.Linear(hidden_size, latent_size)
        self.to_logvar = nn.Linear(hidden_size, latent_size)
        self.to_initial = nn.Linear(latent_size, self.states * num_layers * hidden_size)
        self.decoder = rnn(embedding_dim + latent_size, hidden_size, num_layers)
        self.head = nn.Linear(hidden_size, vocab_size)
        self.kl_weight = 1.0  # the weight of the KL term in elbo()'s loss; training anneals it

    # ------------------------------------------------------------------ inputs
    def _check_batch(self, batch: Sequence[Tensor], name: str = "batch") -> list[Tensor]:
        if isinstance(batch, Tensor) or not isinstance(batch, (list, tuple)):
            raise TypeError(f"{name} must be a list of 1-D LongTensors, got {type(batch).__name__}")
        if not batch:
            raise ValueError(f"{name} is empty")
        for i, ids in enumerate(batch):
            if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.dtype != torch.long:
                what = f"{ids.dim()}-D {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
                raise ValueError(f"{name}[{i}] must be a 1-D LongTensor, got {what}")
        checked = [ids.to(self.head.weight.device) for ids in batch]
        # One range check for the whole batch (one device sync); the offending sentence is looked up only on failure.
        every = torch.cat(checked)
        if every.numel() and (int(every.min()) < FIRST_ID or int(every.max()) >= self.config.vocab_size):
            i = next(i for i, ids in enumerate(checked)
                     if ids.numel() and (int(ids.min()) < FIRST_ID or int(ids.max()) >= self.config.vocab_size))
            raise ValueError(f"{name}[{i}] holds ids outside [{FIRST_ID}, {self.config.vocab_size}) "
                             f"(0, 1, 2 are reserved for padding, start and end)")
        return checked

    def _embedded_packed(self, padded: Tensor, lengths: Tensor, z: Tensor | None = None) -> PackedSequence:
        """padded ids (T, N) -> the embedded sequences (with z appended to every step) as one PackedSequence."""
        x = self.embedding(padded)
        if z is not None:
            x = torch.cat([x, z.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=-1)
        return pack_padded_sequence(x, lengths, enforce_sorted=False)

    # ----------------------------------------------------------------- encoder
    def encode(self, batch: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """batch: N sentences (1-D LongTensors of ids >= 3) -> (mu, logvar), each (N, latent_size)."""
        return self._encode(self._check_batch(batch))

    def _encode(self, sentences: list[Tensor]) -> tuple[Tensor, Tensor]:
        end = sentences[0].new_full((1,), END)
        padded = pad_sequence([torch.cat([s, end]) for s in sentences], padding_value=PAD)
        lengths = torch.tensor([s.numel() + 1 for s in sentences])
        _, state = self.encoder(self._embedded_packed(padded, lengths))
        h = state if self.states == 1 else state[0]
        last = h[-1]  # the last layer's final h, in the batch's order
        return self.to_mu(last), self.to_logvar(last)

    # ----------------------------------------------------------------- decoder
    def initial_state(self, z: Tensor):
        """The decoder's initial state from z (N, latent): h (layers, N, H), or (h, c) for the LSTM."""
        n, layers, hidden = z.shape[0], self.config.num_layers, self.config.hidden_size
        init = torch.tanh(self.to_initial(z)).view(n, self.states, layers, hidden).permute(1, 2, 0, 3)
        return init[0].contiguous() if self.states == 1 else (init[0].contiguous(), init[1].contiguous())

    def _draw(self, shape, generator: torch.Generator | None, uniform: bool = False) -> Tensor:
        device = generator.device if generator is not None else self.head.weight.device
        draw = torch.rand if uniform else torch.randn
        return draw(shape, generator=generator, device=device).to(self.head.weight.device)

    def elbo(self, batch: Sequence[Tensor], generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, reconstruction, kl) of a batch of sentences, each averaged per sentence:
        reconstruction = -log p(sentence, end | z) summed over the sentence's tokens, kl =
        KL(N(mu, sigma^2) || N(0, I)) summed over the latent dimensions, loss = reconstruction +
        self.kl_weight * kl.

        Randomness, in this order: eps (N, latent_size) from torch.randn, then, in training mode
        with word_dropout > 0, a uniform (T, N) from torch.rand (T = longest sentence + 1, time
        major): decoder input word (t, n), t >= 1, becomes PAD where its uniform < word_dropout.
        Both come from `generator` when one is given.
        """
        sentences = self._check_batch(batch)
        mu, logvar = self._encode(sentences)
        eps = self._draw(mu.shape, generator)
        z = mu + torch.exp(0.5 * logvar) * eps

        start, end = sentences[0].new_full((1,), START), sentences[0].new_full((1,), END)
        inputs = pad_sequence([torch.cat([start, s]) for s in sentences], padding_value=PAD)    # (T, N)
        targets = pad_sequence([torch.cat([s, end]) for s in sentences], padding_value=PAD)
        lengths = torch.tensor([s.numel() + 1 for s in sentences])
        if self.training and self.config.word_dropout > 0:
            drop = self._draw(inputs.shape, generator, uniform=True) < self.config.word_dropout
            drop[0] = False  # the start token is always seen
            inputs = inputs.masked_fill(drop, PAD)

        out, _ = self.decoder(self._embedded_packed(inputs, lengths, z), self.initial_state(z))
        # Only real tokens reach the output layer: the packed rows, with the targets packed alike.
        packed_targets = pack_padded_sequence(targets, lengths, enforce_sorted=False).data
        n = len(sentences)
        reconstruction = F.cross_entropy(self.head(out.data), packed_targets, reduction="sum") / n
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / n
        return reconstruction + self.kl_weight * kl, reconstruction, kl

    def _step(self, tokens: Tensor, z: Tensor, state):
        """One decoder step for every row: tokens (N,) -> logits (N, vocab) and the next state."""
        x = torch.cat([self.embedding(tokens), z], dim=-1).unsqueeze(0)
        out, state = self.decoder(x, state)
        return self.head(out[0]), state

    @torch.no_grad()
    def decode(self, z: Tensor, max_len: int = 50, temperature: float = 1.0, top_k: int | None = None,
               top_p: float = 1.0, greedy: bool = False, generator: torch.Generator | None = None) -> list[list[int]]:
        """Sentences from latents z (N, latent): one decoder step per token for all rows together,
        until every row has drawn the end token or max_len tokens. greedy takes the most likely
        token; otherwise genfast's sampling draws it (temperature, then top-k, then top-p).
        Returns the ids of each sentence, without start and end."""
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        if z.dim() != 2 or z.shape[1] != self.config.latent_size:
            raise ValueError(f"z must be (N, {self.config.latent_size}), got shape {tuple(z.shape)}")
        z = z.to(self.head.weight.device, self.head.weight.dtype)
        state = self.initial_state(z)
        tokens = torch.full((z.shape[0],), START, dtype=torch.long, device=z.device)
        sentences: list[list[int]] = [[] for _ in range(z.shape[0])]
        finished = [False] * z.shape[0]
        for _ in range(max_len):
            logits, state = self._step(tokens, z, state)
            logits = logits.float()
            logits[:, :END] = -math.inf  # padding and start are never generated
            if greedy:
                tokens = logits.argmax(-1)
            else:
                tokens = sample_tokens(logits, temperature, top_k, top_p, generator=generator)
            for row, token in enumerate(tokens.tolist()):
                if not finished[row]:
                    if token == END:
                        finished[row] = True
                    else:
                        sentences[row].append(token)
            if all(finished):
                break
        return sentences

    @torch.no_grad()
    def sample(self, n: int, max_len: int = 50, temperature: float = 1.0, top_k: int | None = None,
               top_p: float = 1.0, generator: torch.Generator | None = None) -> list[list[int]]:
        """n sentences from z ~ N(0, I), drawn token by token with genfast's sampling.
        A seeded `generator` (it draws z, then the tokens) gives the same sentences every run."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        z = self._draw((n, self.config.latent_size), generator)
        return self.decode(z, max_len, temperature, top_k, top_p, generator=generator)

    @torch.no_grad()
    def interpolate(self, a: Tensor, b: Tensor, steps: int = 5, max_len: int = 50) -> list[list[int]]:
        """The greedy decodings of `steps` evenly spaced points on the line from a's posterior mean
        to b's (both ends included)."""
        if not isinstance(steps, int) or steps < 2:
            raise ValueError(f"steps must be an int >= 2, got {steps!r}")
        mu, _ = self._encode(self._check_batch([a], "a") + self._check_batch([b], "b"))
        t = torch.linspace(0.0, 1.0, steps, device=mu.device, dtype=mu.dtype)[:, None]
        return self.decode((1 - t) * mu[0] + t * mu[1], max_len, greedy=True)


def with_torch_rnns(model: SentenceVAE) -> SentenceVAE:
    """A copy of `model` whose encoder and decoder are torch.nn.GRU / LSTM with the same weights
    (the baseline of the benchmark and the tests: the same model on PyTorch's own RNNs)."""
    import copy

    twin = copy.deepcopy(model)
    cls = nn.GRU if model.config.cell == "gru" else nn.LSTM
    for name in ("encoder", "decoder"):
        rnn = getattr(model, name)
        weight = rnn.weight_ih_l0
        replacement = cls(rnn.input_size, rnn.hidden_size, rnn.num_layers, device=weight.device, dtype=weight.dtype)
        replacement.load_state_dict(rnn.state_dict())
        setattr(twin, name, replacement.train(rnn.training))
    return twin


# ------------------------------------------------------------------ KL annealing
KL_SCHEDULES = ("logistic", "linear", "constant")


def kl_annealing(step: int, warmup: int, schedule: str = "logistic") -> float:
    """The KL weight at optimiser step `step` (0-based):

        logistic  1 / (1 + exp(-10 (step - warmup/2) / warmup)): 0.0067 at step 0, 0.5 at warmup/2,
                  0.9933 at warmup, then on to 1 (Bowman et al.'s logistic, its midpoint and
                  slope set by the warm-up length)
        linear    min(1, step / warmup)
        constant  1 (no annealing)
    """
    if schedule not in KL_SCHEDULES:
        raise ValueError(f"schedule must be one of {KL_SCHEDULES}, got {schedule!r}")
    if not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup must be a positive int, got {warmup!r}")
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return min(1.0, step / warmup)
    return 1.0 / (1.0 + math.exp(-10.0 * (step - warmup / 2) / warmup))


# -------------------------------------------------------------------- text
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
UNK = 3
_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_NO_SPACE_BEFORE = re.compile(r" ([.,;:!?)\]}'])")
_NO_SPACE_AFTER = re.compile(r"([(\[{]) ")


class CorpusError(ValueError):
    """The text cannot be trained on (missing, empty, too few sentences)."""


class CheckpointError(ValueError):
    """A file that is not a genfast.vae checkpoint."""


@dataclass
class Vocabulary:
    """Token strings by id: ids 0-3 are <pad>, <s>, </s>, <unk>, then the corpus's characters or
    (lower-cased) words, most frequent first."""
    level: str           # "char" or "word"
    tokens: list[str]    # tokens[i] is id i; tokens[:4] == SPECIALS

    def __post_init__(self):
        if self.level not in ("char", "word"):
            raise ValueError(f"level must be 'char' or 'word', got {self.level!r}")
        if tuple(self.tokens[:4]) != SPECIALS:
            raise ValueError(f"a vocabulary starts with {SPECIALS}")
        self.index = {token: i for i, token in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(cls, sentences: list[str], level: str, max_size: int | None = None) -> "Vocabulary":
        """The `max_size` most frequent tokens of the sentences (all if None) after the specials."""
        counts = Counter(t for s in sentences for t in split_tokens(s, level))
        ranked = sorted(counts, key=lambda t: (-counts[t], t))
        if max_size is not None:
            ranked = ranked[:max(0, max_size - len(SPECIALS))]
        return cls(level, list(SPECIALS) + ranked)

    def encode(self, sentence: str) -> Tensor:
        return torch.tensor([self.index.get(t, UNK) for t in split_tokens(sentence, self.level)], dtype=torch.long)

    def decode(self, ids: Sequence[int]) -> str:
        """Text from ids; at the character level <unk> prints as one U+FFFD replacement character."""
        if self.level == "char":
            return "".join("\ufffd" if i == UNK else self.tokens[i] for i in ids)
        tokens = [self.tokens[i] for i in ids]
        text = " ".join(tokens)
        return _NO_SPACE_AFTER.sub(r"\1", _NO_SPACE_BEFORE.sub(r"\1", text))


def split_tokens(sentence: str, level: str) -> list[str]:
    """Characters, or lower-cased words and punctuation marks."""
    return list(sentence) if level == "char" else _WORD.findall(sentence.lower())


def read_sentences(path: str | os.PathLike, level: str, max_len: int) -> list[str]:
    """One sentence per line (blank lines skipped); a line of more than max_len tokens is split at
    its sentence ends (., ! or ? then a space), and pieces still longer than max_len are left out."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"text file {str(path)!r} does not exist")
    sentences = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = " ".join(line.split())
        if not line:
            continue
        pieces = [line] if len(split_tokens(line, level)) <= max_len else _SENTENCE_END.split(line)
        sentences += [p for p in pieces if 0 < len(split_tokens(p, level)) <= max_len]
    if not sentences:
        raise CorpusError(f"text file {str(path)!r} holds no sentence of 1 to {max_len} tokens")
    return sentences


# ----------------------------------------------------------------- training
@dataclass
class TrainSettings:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    grad_clip: float = 5.0
    kl_schedule: str = "logistic"
    kl_warmup: int = 1000       # steps until the KL weight is ~1 (see kl_annealing)
    seed: int = 0
    checkpoint_every: int = 200
    max_len: int = 40           # the longest sentence, in tokens, read from the text (read_sentences)

    def __post_init__(self):
        kl_annealing(0, self.kl_warmup, self.kl_schedule)  # checks both
        for name in ("steps", "batch_size", "checkpoint_every", "max_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")


def check_corpus_size(sentences: int, batch_size: int) -> None:
    """CorpusError unless there are sentences enough for one batch."""
    if sentences < batch_size:
        raise CorpusError(f"the corpus has {sentences} sentences; at least the batch size ({batch_size}) "
                          "is needed to train")


class Batches:
    """Random batches without replacement: each epoch is a fresh permutation of the sentences."""

    def __init__(self, data: list[Tensor], batch_size: int, generator: torch.Generator):
        check_corpus_size(len(data), batch_size)
        self.data, self.batch_size, self.generator = data, batch_size, generator
        self.order: list[int] = []

    def next(self) -> list[Tensor]:
        if len(self.order) < self.batch_size:
            self.order = torch.randperm(len(self.data), generator=self.generator).tolist()
        chosen, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return [self.data[i] for i in chosen]


CHECKPOINT_FORMAT = "genfast.vae/1"


def save_checkpoint(path: str | os.PathLike, model: SentenceVAE, vocab: Vocabulary | None, optimizer, step: int,
                    settings: TrainSettings, rng: dict) -> None:
    """Atomic: written beside the target, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "config": asdict(model.config), "model": model.state_dict(),
                "vocab": None if vocab is None else {"level": vocab.level, "tokens": vocab.tokens},
                "optimizer": optimizer.state_dict() if optimizer is not None else None, "step": step,
                "settings": asdict(settings), "rng": rng}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> tuple[SentenceVAE, Vocabulary | None, dict]:
    """(model in eval mode, its vocabulary, the raw checkpoint dict). FileNotFoundError if the file
    is missing, CheckpointError if it is not a checkpoint written by save_checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001  (any unreadable file is "not ours"; the reason is kept)
        raise CheckpointError(f"{str(path)!r} is not a genfast.vae checkpoint ({type(err).__name__})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a genfast.vae checkpoint (no {CHECKPOINT_FORMAT!r} marker)")
    model = SentenceVAE(**ckpt["config"])
    model.load_state_dict(ckpt["model"])
    vocab = Vocabulary(**ckpt["vocab"]) if ckpt.get("vocab") else None
    return model.eval(), vocab, ckpt


def train(model: SentenceVAE, data: list[Tensor], settings: TrainSettings, checkpoint: str | os.PathLike | None = None,
          vocab: Vocabulary | None = None, resume_from: dict | None = None, progress: bool = True,
          on_step=None) -> list[tuple[float, float, float]]:
    """Adam on the annealed ELBO; returns (reconstruction, kl, kl_weight) of every step run.

    `data` holds the sentences as id tensors. `resume_from` (a checkpoint dict) restores the
    optimizer, the step count and both random streams (batch order; eps and word dropout), so a
    resumed run retraces an uninterrupted one.
    """
    from tqdm import tqdm

    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    data_rng = torch.Generator().manual_seed(settings.seed)
    noise_rng = torch.Generator().manual_seed(settings.seed + 1)
    batches = Batches(data, settings.batch_size, data_rng)
    start = 0
    if resume_from is not None:
        optimizer.load_state_dict(resume_from["optimizer"])
        data_rng.set_state(resume_from["rng"]["data"])
        noise_rng.set_state(resume_from["rng"]["noise"])
        batches.order = list(resume_from["rng"]["order"])
        start = resume_from["step"]
    model.train()
    history = []
    bar = tqdm(range(start, settings.steps), initial=start, total=settings.steps, disable=not progress,
               desc="train", unit="step")
    for step in bar:
        model.kl_weight = kl_annealing(step, settings.kl_warmup, settings.kl_schedule)
        loss, reconstruction, kl = model.elbo(batches.next(), generator=noise_rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        history.append((reconstruction.item(), kl.item(), model.kl_weight))
        bar.set_postfix(rec=f"{history[-1][0]:.2f}", kl=f"{history[-1][1]:.2f}", kl_w=f"{model.kl_weight:.3f}")
        done = step + 1
        if checkpoint is not None and (done % settings.checkpoint_every == 0 or done == settings.steps):
            rng = {"data": data_rng.get_state(), "noise": noise_rng.get_state(), "order": list(batches.order)}
            save_checkpoint(checkpoint, model, vocab, optimizer, done, settings, rng)
        if on_step is not None:
            on_step(done, history[-1])
    model.eval()
    return history


__all__ = ["SentenceVAE", "VAEConfig", "PAD", "START", "END", "FIRST_ID", "with_torch_rnns", "kl_annealing",
           "KL_SCHEDULES", "Vocabulary", "split_tokens", "read_sentences", "CorpusError", "CheckpointError",
           "TrainSettings", "Batches", "check_corpus_size", "train", "save_checkpoint", "load_checkpoint"]
