"""`python -m genfast.char_rnn`: train and sample a char-RNN (the code: genfast/generation/char_rnn_cli.py)."""
import sys

from genfast.generation.char_rnn_cli import main

if __name__ == "__main__":
    sys.exit(main())
