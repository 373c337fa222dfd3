"""genfast's benchmark command: every genfast path against the PyTorch baselines, side by side.

    python -m genfast.bench [--quick | --full] [--filter SUBSTR] [--json P] [--plot P] [--threads N]

Modules: cases (named cases and sets), providers (who computes each op, from one shared
workload), flops (FLOP counts, in one place), timing (warm-up, interleaved rounds,
medians, per-round ratios), machine (run header and GEMM peak), memory (peak memory of
a call), runner (one case end to end), report (table, JSON, CSV, PNG), suite (the
pytest-benchmark glue used by benchmarks/bench_*.py).
"""
