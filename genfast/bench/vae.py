"""The sentence VAE's training step (genfast.generation.vae.SentenceVAE), on genfast's GRU / LSTM
against the same model on torch.nn.GRU / LSTM (genfast.generation.vae.with_torch_rnns): the vae.* cases.

Both providers start from the same weights and take the same batch, the same eps and the same
word-dropout mask (one generator, seeded alike, per call); a call is one Adam step on the
annealed ELBO: forward through encoder and decoder (packed), backward, optimizer step. It
returns the (loss, reconstruction, kl) computed before the step, so the first calls, from the
same weights, must agree.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from genfast.bench import flops


def sentence_lengths(params: dict) -> list[int]:
    """The batch's sentence lengths (tokens, without start and end): uniform in [shortest, longest],
    fixed seed; the first is always the longest."""
    generator = torch.Generator().manual_seed(params.get("seed", 0) + 1)
    lengths = torch.randint(params["shortest"], params["longest"] + 1, (params["batch"],), generator=generator)
    lengths[0] = params["longest"]
    return lengths.tolist()


def step_flops(params: dict, training: bool) -> float:
    """Matrix products of one ELBO evaluation: each sentence + end through the encoder, start +
    sentence through the decoder (its input is the embedding and z), the output layer on every
    decoder step; the small latent layers are left out. Training: 3x (flops.TRAINING_FACTOR_RNN)."""
    steps = sum(length + 1 for length in sentence_lengths(params))
    layers = params.get("num_layers", 1)
    embed, hidden, latent = params["embed"], params["hidden"], params["latent"]
    total = 0.0
    for layer in range(layers):
        encoder_in = embed if layer == 0 else hidden
        decoder_in = embed + latent if layer == 0 else hidden
        total += flops.rnn(params["cell"], steps, encoder_in, hidden, training)
        total += flops.rnn(params["cell"], steps, decoder_in, hidden, training)
    return total + flops.linear(steps, hidden, params["vocab"], training)


@dataclass(eq=False)
class VaeWorkload:
    model: torch.nn.Module       # SentenceVAE on genfast's RNNs, the initial weights every provider copies
    batch: list[torch.Tensor]    # the sentences (ids >= 3)
    seed: int                    # each call's eps and word-dropout generator
    lr: float
    steps_checked: int
    device: str


def make_vae_workload(case, device: str) -> VaeWorkload:
    from genfast.bench.providers import Unavailable, _import_genfast

    p = case.params
    vae = _import_genfast("genfast.generation.vae")
    if case.mode != "training":
        raise Unavailable("skipped", "the vae cases time a training step")
    torch.manual_seed(p.get("seed", 0))
    model = vae.SentenceVAE(p["vocab"], embedding_dim=p["embed"], hidden_size=p["hidden"], latent_size=p["latent"],
                            num_layers=p.get("num_layers", 1), word_dropout=p.get("word_dropout", 0.25),
                            cell=p["cell"]).to(device)
    model.kl_weight = p.get("kl_weight", 1.0)
    generator = torch.Generator().manual_seed(p.get("seed", 0))
    batch = [torch.randint(3, p["vocab"], (length,), generator=generator).to(device)
             for length in sentence_lengths(p)]
    return VaeWorkload(model.train(), batch, p.get("seed", 0), p.get("lr", 1e-3), p.get("steps_checked", 5), device)


def vae_model_for(provider: str, work: VaeWorkload) -> torch.nn.Module:
    if provider == "genfast":
        return copy.deepcopy(work.model)
    from genfast.generation.vae import with_torch_rnns

    return with_torch_rnns(work.model)


def _step(model, optimizer, work: VaeWorkload) -> torch.Tensor:
    generator = torch.Generator().manual_seed(work.seed)
    optimizer.zero_grad(set_to_none=True)
    loss, reconstruction, kl = model.elbo(work.batch, generator=generator)
    loss.backward()
    optimizer.step()
    return torch.stack([loss, reconstruction, kl]).detach()


def vae_train_losses(provider: str, work: VaeWorkload) -> list[float]:
    """The loss of each of work.steps_checked Adam steps from the shared initial weights."""
    model = vae_model_for(provider, work)
    optimizer = torch.optim.Adam(model.parameters(), lr=work.lr)
    return [_step(model, optimizer, work)[0].item() for _ in range(work.steps_checked)]


def vae_provider(provider: str):
    def build(work: VaeWorkload):
        model = vae_model_for(provider, work)
        optimizer = torch.optim.Adam(model.parameters(), lr=work.lr)
        return lambda: _step(model, optimizer, work)
    return build
