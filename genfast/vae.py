"""The sentence VAE (Bowman et al. 2016) on genfast's GRU: `genfast.vae.SentenceVAE`, and
`python -m genfast.vae train|sample|interpolate`. The code: genfast/generation/vae.py (the model,
vocabulary, annealing, training) and genfast/generation/vae_cli.py (the command)."""
import sys

from genfast.generation.vae import (END, PAD, START, CheckpointError, CorpusError, SentenceVAE, TrainSettings,
                                    VAEConfig, Vocabulary, kl_annealing, load_checkpoint, read_sentences,
                                    save_checkpoint, train, with_torch_rnns)

__all__ = ["SentenceVAE", "VAEConfig", "PAD", "START", "END", "Vocabulary", "kl_annealing", "TrainSettings",
           "train", "save_checkpoint", "load_checkpoint", "read_sentences", "with_torch_rnns", "CorpusError",
           "CheckpointError"]

if __name__ == "__main__":
    from genfast.generation.vae_cli import main

    sys.exit(main())
