"""Generate text with a local GPT-2 checkpoint on genfast's kernels, streaming tokens as they come.

    python -m genfast.generate --model path/to/gpt2 --prompt "Once upon a time" --max-new-tokens 100
    python -m genfast.generate --model path/to/gpt2 --prompt "Hi" --top-k 50 --top-p 0.95 --temperature 0.8 \
        --num-return-sequences 3 --seed 0

--model is a directory with config.json, model.safetensors (or pytorch_model.bin) and the
tokenizer files (tokenizer.json, or vocab.json + merges.txt), e.g. from transformers'
save_pretrained. Nothing is downloaded. Sampling is on when --do-sample or any of
--temperature / --top-k / --top-p is given; otherwise decoding is greedy.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _missing_files(model_dir: Path) -> list[str]:
    missing = []
    if not (model_dir / "config.json").is_file():
        missing.append("config.json")
    if not any((model_dir / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        missing.append("model.safetensors (or pytorch_model.bin)")
    has_tokenizer = (model_dir / "tokenizer.json").is_file() or (
        (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file())
    if not has_tokenizer:
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    return missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genfast.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local GPT-2 directory (nothing is downloaded)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--do-sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--num-return-sequences", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    args = parser.parse_args(argv)

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        print(f"error: model directory {args.model!r} does not exist. genfast downloads nothing: point --model "
              "at a directory saved with transformers' save_pretrained (model and tokenizer).", file=sys.stderr)
        return 2
    missing = _missing_files(model_dir)
    if missing:
        print(f"error: {args.model} lacks: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        from transformers import GPT2TokenizerFast, TextStreamer
    except ImportError:
        print("error: the tokenizer needs transformers (pip install -r requirements-dev.txt)", file=sys.stderr)
        return 2
    from genfast.generation.gpt2 import GPT2

    tokenizer = GPT2TokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
    model = GPT2.from_hf(model_dir)
    input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    if input_ids.shape[1] == 0:
        print("error: the prompt encodes to no tokens", file=sys.stderr)
        return 2
    do_sample = args.do_sample or any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    stream = args.num_return_sequences == 1
    try:
        output = model.generate(
            input_ids, args.max_new_tokens, do_sample=do_sample,
            temperature=args.temperature if args.temperature is not None else 1.0, top_k=args.top_k,
            top_p=args.top_p if args.top_p is not None else 1.0, repetition_penalty=args.repetition_penalty,
            num_return_sequences=args.num_return_sequences, eos_token_id=model.config.eos_token_id,
            generator=generator, streamer=TextStreamer(tokenizer) if stream else None)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not stream:
        for i, row in enumerate(output):
            print(f"=== sequence {i + 1} ===")
            print(tokenizer.decode(row, skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
