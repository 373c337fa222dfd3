"""pytest-benchmark suite for GPT-2 greedy generation (genfast.generation.gpt2 vs transformers)."""
import pytest

from genfast.bench import suite


@pytest.mark.parametrize("case, provider", suite.params("gpt2"))
def test_gpt2(benchmark, case, provider):
    suite.run(benchmark, case, provider)
