"""pytest-benchmark suite for gru_reset_before: the genfast.bench cases of op 'gru_reset_before', one benchmark per provider."""
import pytest

from genfast.bench import suite


@pytest.mark.parametrize("case, provider", suite.params("gru_reset_before"))
def test_gru_reset_before(benchmark, case, provider):
    suite.run(benchmark, case, provider)
