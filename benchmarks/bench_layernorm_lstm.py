"""pytest-benchmark suite for layernorm_lstm: the genfast.bench cases of op 'layernorm_lstm', one benchmark per provider."""
import pytest

from genfast.bench import suite


@pytest.mark.parametrize("case, provider", suite.params("layernorm_lstm"))
def test_layernorm_lstm(benchmark, case, provider):
    suite.run(benchmark, case, provider)
