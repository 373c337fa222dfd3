"""Train and sample a character-level LSTM/GRU language model on genfast's fused kernels.

    python -m genfast.char_rnn train --text input.txt --checkpoint char.pt --steps 2000
    python -m genfast.char_rnn train --text input.txt --checkpoint char.pt --steps 4000 --resume
    python -m genfast.char_rnn sample --checkpoint char.pt --prompt "ROMEO:" --length 300 \
        --temperature 0.8 --top-k 10

Sampling streams characters to stdout as they are drawn.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _train(args) -> int:
    from genfast.generation.char_rnn import CharRNN, CharRNNConfig, TrainSettings, load_checkpoint, train

    text_path = Path(args.text)
    if not text_path.is_file():
        print(f"error: --text {args.text!r} does not exist", file=sys.stderr)
        return 2
    text = text_path.read_text(encoding="utf-8")
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                             grad_clip=args.grad_clip, seed=args.seed, checkpoint_every=args.checkpoint_every)
    resume_from = None
    if args.resume:
        if not Path(args.checkpoint).is_file():
            print(f"error: --resume given but checkpoint {args.checkpoint!r} does not exist", file=sys.stderr)
            return 2
        model, resume_from = load_checkpoint(args.checkpoint)
        unknown = sorted(set(text) - set(model.config.vocab))
        if unknown:
            print(f"error: the text has characters the checkpoint's vocabulary lacks: {unknown!r}", file=sys.stderr)
            return 2
        # The run's length may be extended on resume; the rest of the settings are the saved run's.
        settings = TrainSettings(**{**resume_from["settings"], "steps": args.steps})
        print(f"resuming from step {resume_from['step']} of {args.checkpoint}", file=sys.stderr)
    else:
        torch.manual_seed(args.seed)
        config = CharRNNConfig(vocab="".join(sorted(set(text))), hidden_size=args.hidden_size,
                               num_layers=args.num_layers, cell=args.cell, embedding_dim=args.embedding_dim)
        model = CharRNN(config)
    losses = train(model, text, settings, checkpoint=args.checkpoint, resume_from=resume_from,
                   progress=not args.quiet)
    if losses:
        print(f"trained steps {settings.steps - len(losses) + 1}..{settings.steps}: loss {losses[0]:.4f} -> "
              f"{losses[-1]:.4f}; checkpoint {args.checkpoint}", file=sys.stderr)
    return 0


def _sample(args) -> int:
    from genfast.generation.char_rnn import load_checkpoint

    try:
        model, _ = load_checkpoint(args.checkpoint)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    prompt = args.prompt if args.prompt else model.config.vocab[0]
    try:
        stream = model.stream(prompt, args.length, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, generator=generator)
        sys.stdout.write(prompt)
        for ch in stream:
            sys.stdout.write(ch)
            sys.stdout.flush()
    except ValueError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genfast.char_rnn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train on a text file (checkpoints periodically)")
    t.add_argument("--text", required=True, help="UTF-8 text file to learn from")
    t.add_argument("--checkpoint", default="char_rnn.pt", help="checkpoint file, written every --checkpoint-every")
    t.add_argument("--resume", action="store_true", help="continue training from --checkpoint")
    t.add_argument("--steps", type=int, default=1000, help="total optimiser steps (including resumed ones)")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--seq-len", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--hidden-size", type=int, default=256)
    t.add_argument("--num-layers", type=int, default=2)
    t.add_argument("--embedding-dim", type=int, default=64)
    t.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    t.add_argument("--checkpoint-every", type=int, default=200)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(run=_train)

    s = sub.add_parser("sample", help="stream characters from a checkpoint")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--prompt", default="", help="text to continue (default: the vocabulary's first character)")
    s.add_argument("--length", type=int, default=200, help="characters to generate")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    s.set_defaults(run=_sample)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
