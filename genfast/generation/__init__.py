"""Autoregressive generation on genfast's kernels: GPT-2 with a KV cache, a char-RNN language model,
and the pieces they share.

    genfast.generation.gpt2        GPT2, GPT2Config, KVCache (Hugging Face-compatible generate)
    genfast.generation.char_rnn    CharRNN, CharRNNConfig, train, save/load_checkpoint
    genfast.generation.sampling    process_logits, sample, apply_repetition_penalty
    genfast.generation.decode      decode_attention, linear: the decode step's attention and linear layers
    genfast.generation.ops         typed wrappers over generation's ops (torch.ops.genfast.sampling_*,
                                   decode_attention, decode_linear, gpt2_decode_block)
    genfast.generation.gpt2_cli    `python -m genfast.generate`
    genfast.generation.char_rnn_cli `python -m genfast.char_rnn`
    genfast.generation.vae         SentenceVAE (Bowman et al.'s sentence VAE), Vocabulary, kl_annealing, train
    genfast.generation.vae_cli     `python -m genfast.vae` (genfast.vae re-exports the model)

Generation builds on the core (genfast.nn, genfast.ops); the core imports nothing from here.
Submodules are imported on first use.
"""
from __future__ import annotations

import importlib

_SUBMODULES = {"gpt2", "char_rnn", "sampling", "decode", "ops", "gpt2_cli", "char_rnn_cli", "vae", "vae_cli"}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"genfast.generation.{name}")
    raise AttributeError(f"module 'genfast.generation' has no attribute {name!r}")
