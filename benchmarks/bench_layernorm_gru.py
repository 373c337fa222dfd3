"""pytest-benchmark suite for layernorm_gru: the genfast.bench cases of op 'layernorm_gru', one benchmark per provider."""
import pytest

from genfast.bench import suite


@pytest.mark.parametrize("case, provider", suite.params("layernorm_gru"))
def test_layernorm_gru(benchmark, case, provider):
    suite.run(benchmark, case, provider)
