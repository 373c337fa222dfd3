"""pytest-benchmark suite for the sentence VAE's training step (genfast GRU against torch.nn.GRU)."""
import pytest

from genfast.bench import suite


@pytest.mark.parametrize("case, provider", suite.params("vae"))
def test_vae(benchmark, case, provider):
    suite.run(benchmark, case, provider)
