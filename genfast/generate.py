"""`python -m genfast.generate`: text from a local GPT-2 checkpoint (the code: genfast/generation/gpt2_cli.py)."""
import sys

from genfast.generation.gpt2_cli import main

if __name__ == "__main__":
    sys.exit(main())
