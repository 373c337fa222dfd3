"""Train a sentence VAE (Bowman et al. 2016) on genfast's GRU, sample from it, interpolate between sentences.

    python -m genfast.vae train --text sentences.txt --checkpoint vae.pt --steps 2000 --level word
    python -m genfast.vae train --text sentences.txt --checkpoint vae.pt --steps 4000 --resume
    python -m genfast.vae sample --checkpoint vae.pt --n 5 --temperature 0.8 --top-k 20 --seed 0
    python -m genfast.vae interpolate --checkpoint vae.pt --a "the first sentence" --b "another one" --steps 5

The text file holds one sentence per line; lines longer than --max-len tokens are split at
sentence ends. The word level keeps the --vocab-size most frequent (lower-cased) words and maps
the rest to <unk>. The progress bar shows the reconstruction loss (rec), the KL term (kl) and the
KL weight (kl_w) of each step.
"""
from __future__ import annotations

import argparse
import sys

import torch

_DEFAULT_MAX_LEN = {"word": 40, "char": 120}


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _train(args) -> int:
    from genfast.generation import vae

    resume_from = None
    if args.resume:
        model, vocab, resume_from = vae.load_checkpoint(args.checkpoint)
        if vocab is None:
            return _error(f"checkpoint {args.checkpoint!r} holds no vocabulary to read the text with")
        saved = resume_from["settings"]
        # The run's length may be extended on resume; the rest of the settings are the saved run's.
        settings = vae.TrainSettings(**{**saved, "steps": args.steps})
        sentences = vae.read_sentences(args.text, vocab.level, settings.max_len)
        print(f"resuming from step {resume_from['step']} of {args.checkpoint}", file=sys.stderr)
    else:
        max_len = args.max_len or _DEFAULT_MAX_LEN[args.level]
        sentences = vae.read_sentences(args.text, args.level, max_len)
        vocab = vae.Vocabulary.build(sentences, args.level, args.vocab_size if args.level == "word" else None)
        settings = vae.TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                     grad_clip=args.grad_clip, kl_schedule=args.kl_schedule,
                                     kl_warmup=args.kl_warmup or max(1, args.steps // 2), seed=args.seed,
                                     checkpoint_every=args.checkpoint_every, max_len=max_len)
        torch.manual_seed(args.seed)
        model = vae.SentenceVAE(len(vocab), embedding_dim=args.embedding_dim, hidden_size=args.hidden_size,
                                latent_size=args.latent_size, num_layers=args.num_layers,
                                word_dropout=args.word_dropout, cell=args.cell)
    vae.check_corpus_size(len(sentences), settings.batch_size)
    data = [vocab.encode(s) for s in sentences]
    if not args.quiet:
        print(f"{len(data)} sentences, {len(vocab)} {vocab.level} tokens in the vocabulary", file=sys.stderr)
    history = vae.train(model, data, settings, checkpoint=args.checkpoint, vocab=vocab, resume_from=resume_from,
                        progress=not args.quiet)
    if history:
        first, last = history[0], history[-1]
        print(f"trained steps {settings.steps - len(history) + 1}..{settings.steps}: reconstruction "
              f"{first[0]:.3f} -> {last[0]:.3f}, kl {first[1]:.3f} -> {last[1]:.3f}, kl weight {last[2]:.3f}; "
              f"checkpoint {args.checkpoint}", file=sys.stderr)
    return 0


def _load(path: str):
    from genfast.generation import vae

    model, vocab, _ = vae.load_checkpoint(path)
    if vocab is None:
        raise vae.CheckpointError(f"checkpoint {path!r} holds no vocabulary")
    return model, vocab


def _sample(args) -> int:
    model, vocab = _load(args.checkpoint)
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    for ids in model.sample(args.n, max_len=args.max_len, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, generator=generator):
        print(vocab.decode(ids))
    return 0


def _interpolate(args) -> int:
    model, vocab = _load(args.checkpoint)
    ends = []
    for name, text in (("--a", args.a), ("--b", args.b)):
        ids = vocab.encode(text)
        if ids.numel() == 0:
            return _error(f"{name} holds no token")
        ends.append(ids)
    for ids in model.interpolate(ends[0], ends[1], steps=args.steps, max_len=args.max_len):
        print(vocab.decode(ids))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genfast.vae", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train on a text file of sentences (checkpoints periodically)")
    t.add_argument("--text", required=True, help="UTF-8 text file, one sentence per line")
    t.add_argument("--checkpoint", required=True, help="checkpoint file, written every --checkpoint-every steps")
    t.add_argument("--resume", action="store_true", help="continue training from --checkpoint")
    t.add_argument("--steps", type=int, default=2000, help="total optimiser steps (including resumed ones)")
    t.add_argument("--level", choices=["char", "word"], default="word")
    t.add_argument("--vocab-size", type=int, default=10000, help="word level: the most frequent words kept, "
                   "<unk> and the 3 reserved tokens included")
    t.add_argument("--max-len", type=int, default=None, help="longest sentence in tokens (default: 40 words or "
                   "120 characters)")
    t.add_argument("--embedding-dim", type=int, default=256)
    t.add_argument("--hidden-size", type=int, default=512)
    t.add_argument("--latent-size", type=int, default=32)
    t.add_argument("--num-layers", type=int, default=1)
    t.add_argument("--cell", choices=["gru", "lstm"], default="gru")
    t.add_argument("--word-dropout", type=float, default=0.25)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--grad-clip", type=float, default=5.0)
    t.add_argument("--kl-schedule", choices=["logistic", "linear", "constant"], default="logistic")
    t.add_argument("--kl-warmup", type=int, default=None, help="steps until the KL weight reaches ~1 "
                   "(default: half of --steps)")
    t.add_argument("--checkpoint-every", type=int, default=200)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(run=_train)

    s = sub.add_parser("sample", help="print sentences decoded from z ~ N(0, I)")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--n", type=int, default=5, help="sentences to sample")
    s.add_argument("--max-len", type=int, default=50, help="most tokens per sentence")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    s.set_defaults(run=_sample)

    i = sub.add_parser("interpolate", help="print the greedy decodings along the line between two sentences")
    i.add_argument("--checkpoint", required=True)
    i.add_argument("--a", required=True, help="the first sentence")
    i.add_argument("--b", required=True, help="the last sentence")
    i.add_argument("--steps", type=int, default=5, help="points on the line, both ends included")
    i.add_argument("--max-len", type=int, default=50, help="most tokens per sentence")
    i.set_defaults(run=_interpolate)

    args = parser.parse_args(argv)
    from genfast.generation.vae import CheckpointError, CorpusError

    try:
        return args.run(args)
    except (FileNotFoundError, CorpusError, CheckpointError) as err:
        return _error(str(err))
    except ValueError as err:  # a setting out of range (temperature, top-p, steps ...), named by the check
        return _error(str(err))


if __name__ == "__main__":
    sys.exit(main())
