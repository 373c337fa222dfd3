"""pytest-benchmark suite for the IMDB sentiment model (Embedding -> LSTM -> LSTM -> Linear)."""
import pytest

from genfast.bench import suite


@pytest.mark.parametrize("case, provider", suite.params("imdb"))
def test_imdb(benchmark, case, provider):
    suite.run(benchmark, case, provider)
