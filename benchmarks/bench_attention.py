"""pytest-benchmark suite for attention: the genfast.bench cases of op 'attention', one benchmark per provider."""
import pytest

from genfast.bench import suite


@pytest.mark.parametrize("case, provider", suite.params("attention"))
def test_attention(benchmark, case, provider):
    suite.run(benchmark, case, provider)
