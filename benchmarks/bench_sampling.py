"""pytest-benchmark suite for one sampling step (genfast's fused filter + draw vs the reference and transformers)."""
import pytest

from genfast.bench import suite


@pytest.mark.parametrize("case, provider", suite.params("sampling"))
def test_sampling(benchmark, case, provider):
    suite.run(benchmark, case, provider)
