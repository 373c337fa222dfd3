"""pytest-benchmark suite for gru: the genfast.bench cases of op 'gru', one benchmark per provider."""
import pytest

from genfast.bench import suite


@pytest.mark.parametrize("case, provider", suite.params("gru"))
def test_gru(benchmark, case, provider):
    suite.run(benchmark, case, provider)
