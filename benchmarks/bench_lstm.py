"""pytest-benchmark suite for lstm: the genfast.bench cases of op 'lstm', one benchmark per provider."""
import pytest

from genfast.bench import suite


@pytest.mark.parametrize("case, provider", suite.params("lstm"))
def test_lstm(benchmark, case, provider):
    suite.run(benchmark, case, provider)
