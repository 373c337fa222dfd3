"""genfast's benchmark command: every genfast path against the PyTorch baselines, side by side.

    python -m genfast.bench [--quick | --full | --smoke] [--device cpu|cuda] [--filter SUBSTR[,SUBSTR]]
                            [--json P] [--plot P] [--csv P] [--threads N] [--list] [--no-peak]
    python -m genfast.bench --ab OTHER_CHECKOUT [--ab-rounds N] [set and filter options]

Modules: cases (named cases and sets, per device), providers (who computes each op, from one
shared workload), flops (FLOP counts, in one place), timing (the one place a clock is read:
warm-up, interleaved rounds, medians, per-round ratios; wall clock, CUDA events or Triton's
do_bench), machine (run header, GEMM peak from torch.mm and genfast._probe), memory (peak memory
of a call), runner (one case end to end), report (table, JSON, CSV, PNG), suite (the glue for the
pytest-benchmark files in benchmarks/), ab and ab_worker (--ab: two builds, alternating
processes), generation (the GPT-2 cases' command alias).
"""
