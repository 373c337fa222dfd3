"""A character-level language model (Karpathy's char-rnn) on genfast's fused LSTM/GRU.

    model = CharRNN(vocab=sorted(set(text)), hidden_size=256, num_layers=2, cell="lstm")
    train(model, text, TrainSettings(steps=1000))        # or the command: python -m genfast.char_rnn
    for ch in model.stream("ROMEO:", 200, temperature=0.8, top_k=10): print(ch, end="")

Training runs the whole (T, N) window through genfast.nn.LSTM / GRU (one fused call per
layer). Sampling feeds the prompt once, then one character at a time as a T = 1 step
with the carried (h, c) state: each character costs one fused step per layer.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import genfast.nn as gnn
from genfast.generation.sampling import sample


@dataclass
class CharRNNConfig:
    vocab: str                # the characters, index = token id
    hidden_size: int = 256
    num_layers: int = 2
    cell: str = "lstm"        # "lstm" or "gru"
    embedding_dim: int = 64

    def __post_init__(self):
        if self.cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {self.cell!r}")
        if len(set(self.vocab)) != len(self.vocab) or not self.vocab:
            raise ValueError("vocab must be a non-empty string of distinct characters")


class CharRNN(nn.Module):
    def __init__(self, config: CharRNNConfig):
        super().__init__()
        self.config = config
        self.index = {ch: i for i, ch in enumerate(config.vocab)}
        self.embed = nn.Embedding(len(config.vocab), config.embedding_dim)
        rnn = gnn.LSTM if config.cell == "lstm" else gnn.GRU
        self.rnn = rnn(config.embedding_dim, config.hidden_size, config.num_layers)
        self.head = nn.Linear(config.hidden_size, len(config.vocab))

    def encode(self, text: str) -> Tensor:
        unknown = sorted(set(text) - self.index.keys())
        if unknown:
            raise ValueError(f"characters not in the model's vocabulary: {unknown!r}")
        return torch.tensor([self.index[ch] for ch in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.config.vocab[i] for i in ids)

    def forward(self, ids: Tensor, state=None):
        """ids (T, N) -> logits (T, N, vocab) and the recurrent state after the last step."""
        out, state = self.rnn(self.embed(ids), state)
        return self.head(out), state

    @torch.inference_mode()
    def stream(self, prompt: str, length: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float = 1.0, generator: torch.Generator | None = None) -> Iterator[str]:
        """Yields `length` new characters one by one, sampled after `prompt` (HF's processing order)."""
        if not prompt:
            raise ValueError("prompt must hold at least one character")
        device = self.head.weight.device
        logits, state = self(self.encode(prompt).to(device)[:, None])
        logits = logits[-1]
        for i in range(length):
            token = sample(logits.float(), temperature, top_k, top_p, generator=generator)
            yield self.config.vocab[int(token)]
            if i + 1 < length:
                logits, state = self(token[None, :], state)  # one T = 1 step per layer, state carried
                logits = logits[-1]

    def generate(self, prompt: str, length: int, **kwargs) -> str:
        return "".join(self.stream(prompt, length, **kwargs))


# ---------------------------------------------------------------------- training
@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 64
    lr: float = 2e-3
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200


def random_windows(data: Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(inputs, targets), each (seq_len, batch): random windows of the text and the next characters."""
    if data.numel() < seq_len + 1:
        raise ValueError(f"text has {data.numel()} characters; seq_len + 1 = {seq_len + 1} needed")
    starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len + 1)
    windows = data[starts[:, None] + offsets].t()  # (seq_len + 1, batch)
    return windows[:-1], windows[1:]


def save_checkpoint(path: str | os.PathLike, model: CharRNN, optimizer, step: int, settings: TrainSettings,
                    generator: torch.Generator) -> None:
    """Atomic: written beside the target, then renamed over it (a crash never leaves half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"config": asdict(model.config), "model": model.state_dict(),
                "optimizer": optimizer.state_dict() if optimizer is not None else None, "step": step,
                "settings": asdict(settings), "rng": generator.get_state()}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> tuple[CharRNN, dict]:
    """The model (eval mode) and the raw checkpoint dict (optimizer state, step, settings, rng)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    model = CharRNN(CharRNNConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def train(model: CharRNN, text: str, settings: TrainSettings, checkpoint: str | os.PathLike | None = None,
          resume_from: dict | None = None, progress: bool = True, on_step=None) -> list[float]:
    """Adam on next-character cross-entropy; returns the loss of every step run.

    ``resume_from`` (a checkpoint dict) restores the optimizer, step count and data RNG,
    so a resumed run continues where the saved one stopped.
    """
    from tqdm import tqdm

    data = model.encode(text)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    start = 0
    if resume_from is not None:
        optimizer.load_state_dict(resume_from["optimizer"])
        generator.set_state(resume_from["rng"])
        start = resume_from["step"]
    model.train()
    losses = []
    bar = tqdm(range(start, settings.steps), initial=start, total=settings.steps, disable=not progress,
               desc="train", unit="step")
    for step in bar:
        inputs, targets = random_windows(data, settings.batch_size, settings.seq_len, generator)
        logits, _ = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        done = step + 1
        if checkpoint is not None and (done % settings.checkpoint_every == 0 or done == settings.steps):
            save_checkpoint(checkpoint, model, optimizer, done, settings, generator)
        if on_step is not None:
            on_step(done, losses[-1])
    model.eval()
    return losses


__all__ = ["CharRNN", "CharRNNConfig", "TrainSettings", "train", "save_checkpoint", "load_checkpoint",
           "random_windows"]
