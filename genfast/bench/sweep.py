"""The shape sweep: genfast's LSTM and GRU against torch.nn over a grid of batch and hidden sizes.

    python -m genfast.bench --sweep                          # the whole grid and the extra runs
    python -m genfast.bench --sweep --sweep-out DIR          # where the CSV and heatmaps go
    python -m genfast.bench --sweep --sweep-cells lstm --sweep-modes training --sweep-n 8,64 --sweep-h 256

The grid: N (batch) x H (hidden, I = H) at T = 50, for each cell (lstm, gru) and mode (inference:
forward only; training: forward + backward through the weights). The extra runs: a few shapes at
T = 10, 200 and 1000, and packed input (PackedSequence, lengths uniform in [T/3, T]). Each case is
one run of the harness (genfast.bench.runner: the same workload for both, outputs compared, timed in
interleaved rounds by genfast.bench.timing); ratio = torch.nn's time / genfast's, the median of the
per-round ratios (> 1: genfast is faster).

Output in --sweep-out: sweep.csv (one row per case, written as the sweep goes) and one heatmap PNG per
(cell, mode) of the grid's ratios, coloured on a log scale centred at 1, every cell annotated with its
ratio, and cells below 0.95 outlined.

Time: small shapes are timed for --sweep-budget seconds each; large ones, whose calls take seconds,
get as few as --sweep-min-rounds rounds (the warm-up call says how long a call takes). The whole
default sweep takes about a quarter of an hour on a 2-core CPU.
"""
from __future__ import annotations

import csv
import datetime
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

GRID_N = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GRID_H = (32, 64, 128, 256, 512, 1024)
GRID_T = 50
CELLS = ("lstm", "gru")
MODES = ("inference", "training")
# Extra runs off the grid: sequence length at two (N, H) points, and packed input.
EXTRA_T = (10, 200, 1000)
EXTRA_T_SHAPES = ((8, 128), (64, 256))
EXTRA_PACKED_SHAPES = ((16, 128), (64, 256), (64, 512))
FLAG_BELOW = 0.95   # cells under this ratio are outlined in the heatmaps and listed at the end

COLUMNS = ("cell", "mode", "T", "N", "H", "I", "packed", "ratio", "ratio_q1", "ratio_q3", "ratio_best", "rounds",
           "genfast_ms", "torch_ms", "genfast_gflops", "torch_gflops", "max_abs_diff", "status", "reason",
           "simd", "threads", "clock", "commit", "date")


@dataclass(frozen=True)
class Shape:
    cell: str
    mode: str
    T: int
    N: int
    H: int
    packed: bool = False

    def case(self):
        from genfast.bench.cases import _rnn

        workload = f"sweep.t{self.T}.n{self.N}.h{self.H}" + (".packed" if self.packed else "")
        extra = {"packed": True} if self.packed else {}
        return _rnn(self.cell, workload, self.mode, ("torch",), T=self.T, N=self.N, input_size=self.H,
                    hidden_size=self.H, **extra)


def shapes(cells=CELLS, modes=MODES, ns=GRID_N, hs=GRID_H, T=GRID_T, extras=True) -> list[Shape]:
    """The grid (cheap shapes first, so a short run still covers most of it), then the extra runs."""
    grid = [Shape(c, m, T, n, h) for c in cells for m in modes for h in hs for n in ns]
    if not extras:
        return grid
    more = [Shape(c, m, t, n, h) for c in cells for m in modes for t in EXTRA_T for n, h in EXTRA_T_SHAPES]
    more += [Shape(c, m, GRID_T, n, h, packed=True) for c in cells for m in modes for n, h in EXTRA_PACKED_SHAPES]
    return grid + more


def plan(budget_s: float, min_rounds: int):
    from genfast.bench import timing

    return timing.TimingPlan(warmup_calls=1, warmup_s=0.02, min_sample_s=0.005, min_rounds=5, max_rounds=50,
                             budget_s=budget_s, min_rounds_floor=min_rounds)


def require_matplotlib():
    """matplotlib, imported here rather than at the top so the rest of genfast.bench runs without it."""
    try:
        import matplotlib
    except ImportError as err:
        raise SystemExit("--sweep draws its heatmaps with matplotlib, which is not installed "
                         f"({err}); install it (pip install matplotlib, or genfast[bench])") from err
    matplotlib.use("Agg")
    return matplotlib


def row_for(shape: Shape, result, header: dict) -> dict:
    """One CSV row from a runner.CaseResult."""
    ours, theirs = result.providers["genfast"], result.providers["torch"]
    row = {"cell": shape.cell, "mode": shape.mode, "T": shape.T, "N": shape.N, "H": shape.H, "I": shape.H,
           "packed": int(shape.packed), "simd": header["simd"], "threads": header["threads"], "clock": header["clock"],
           "commit": header["commit"], "date": header["date"]}
    speedup = result.speedups.get("genfast", {}).get("torch")
    if speedup is None:
        failed = ours if not ours.ok else theirs
        row.update(status=failed.status, reason=f"{failed.name}: {failed.reason}")
        return row
    diff = result.checks.get("max_abs_diff", {}).get("genfast vs torch")
    row.update(ratio=f"{speedup.median:.4f}", ratio_q1=f"{speedup.q1:.4f}", ratio_q3=f"{speedup.q3:.4f}",
               ratio_best=f"{theirs.stats.min / ours.stats.min:.4f}", rounds=speedup.n, genfast_ms=f"{ours.stats.median * 1e3:.4f}",
               torch_ms=f"{theirs.stats.median * 1e3:.4f}", genfast_gflops=f"{ours.gflops:.2f}",
               torch_gflops=f"{theirs.gflops:.2f}", max_abs_diff="" if diff is None else f"{diff:.3g}",
               status="ok", reason="")
    return row


def read_csv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def heatmap(path, rows: list[dict], cell: str, mode: str, title: str, T: int = GRID_T, stat: str = "ratio"):
    """One (cell, mode)'s grid (unpacked, sequence length T) as a heatmap: N down, H across, colour
    log2(ratio) centred at 0 (parity). stat: the column shown ("ratio", the median of the per-round
    ratios, or "ratio_best", fastest against fastest). Returns the (N, H) of the outlined cells
    (ratio < FLAG_BELOW), or None (and draws nothing) when the rows hold no such shape."""
    require_matplotlib()
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    mine = [r for r in rows if r["cell"] == cell and r["mode"] == mode and not int(r["packed"])
            and int(r["T"]) == T]
    if not mine:
        return None
    ns = sorted({int(r["N"]) for r in mine})
    hs = sorted({int(r["H"]) for r in mine})
    ratio = [[math.nan] * len(hs) for _ in ns]
    for r in mine:
        if r.get("status") == "ok" and r.get(stat):
            ratio[ns.index(int(r["N"]))][hs.index(int(r["H"]))] = float(r[stat])
    logs = [math.log2(v) for line in ratio for v in line if not math.isnan(v)]
    span = max([abs(v) for v in logs] + [math.log2(1.5)])
    norm = TwoSlopeNorm(vmin=-span, vcenter=0.0, vmax=span)
    shown = [[math.log2(v) if not math.isnan(v) else math.nan for v in line] for line in ratio]

    fig, ax = plt.subplots(figsize=(max(6.5, 1.0 * len(hs) + 2.5), 0.45 * len(ns) + 2.4))
    cmap = plt.get_cmap("RdBu").with_extremes(bad="lightgrey")
    image = ax.imshow(shown, cmap=cmap, norm=norm, aspect="auto")
    outlined = []
    for i, line in enumerate(ratio):
        for j, value in enumerate(line):
            if math.isnan(value):
                ax.text(j, i, "-", ha="center", va="center", fontsize=8)
                continue
            low = value < FLAG_BELOW
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    fontweight="bold" if low else "normal", color="white" if abs(math.log2(value)) > 0.6 * span else "black")
            if low:
                outlined.append((ns[i], hs[j]))
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
    ax.set_xticks(range(len(hs)), [str(h) for h in hs])
    ax.set_yticks(range(len(ns)), [str(n) for n in ns])
    ax.set_xlabel("H (= I)")
    ax.set_ylabel("N (batch)")
    ax.set_title(title, fontsize=8)
    bar = fig.colorbar(image, ax=ax)
    ticks = [t for t in (0.125, 0.25, 0.5, 0.8, 1.0, 1.25, 2.0, 4.0, 8.0) if abs(math.log2(t)) <= span]
    bar.set_ticks([math.log2(t) for t in ticks], labels=[f"{t:g}x" for t in ticks])
    bar.set_label("torch.nn time / genfast time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return outlined


STAT_TEXT = {"ratio": "median over rounds of torch time / genfast time",
             "ratio_best": "torch's fastest round / genfast's fastest round"}


def heatmaps(rows: list[dict], out_dir: Path, header: dict, T: int = GRID_T, stat: str = "ratio") -> list[Path]:
    written = []
    for cell in CELLS:
        for mode in MODES:
            path = out_dir / f"{cell}_{mode}.png"
            title = (f"genfast.nn.{cell.upper()} vs torch.nn.{cell.upper()}, {mode}, T={T}, I=H, "
                     f"{header.get('clock', 'wall')} clock\n"
                     f"{STAT_TEXT[stat]} (> 1: genfast faster; outlined: < {FLAG_BELOW})\n"
                     f"{header['cpu']}, {header['simd']}, {header['threads']} threads, "
                     f"{header['commit']}, {header['date']}")
            if heatmap(path, rows, cell, mode, title, T, stat) is not None:
                written.append(path)
    return written


def _ints(text: str | None, default, name: str):
    if text is None:
        return default
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SystemExit(f"{name} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"{name} takes positive integers, got {text!r}")
    return values


def _names(text: str | None, allowed, name: str):
    if text is None:
        return allowed
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise SystemExit(f"{name} takes a comma-separated subset of {','.join(allowed)}, got {text!r}")
    return values


def add_arguments(parser) -> None:
    group = parser.add_argument_group("shape sweep (--sweep)")
    group.add_argument("--sweep", action="store_true",
                       help="the LSTM/GRU shape sweep against torch.nn: CSV and heatmaps (not part of --quick)")
    group.add_argument("--sweep-out", metavar="DIR", default="benchmarks/results/sweep",
                       help="where sweep.csv and the heatmaps go (default benchmarks/results/sweep)")
    group.add_argument("--sweep-cells", metavar="LIST", help="comma-separated subset of lstm,gru")
    group.add_argument("--sweep-modes", metavar="LIST", help="comma-separated subset of inference,training")
    group.add_argument("--sweep-n", metavar="LIST", help=f"batch sizes (default {','.join(map(str, GRID_N))})")
    group.add_argument("--sweep-h", metavar="LIST",
                       help=f"hidden sizes, I = H (default {','.join(map(str, GRID_H))})")
    group.add_argument("--sweep-t", type=int, metavar="T", default=GRID_T,
                       help=f"the grid's sequence length (default {GRID_T})")
    group.add_argument("--sweep-no-extras", action="store_true",
                       help="only the grid: no runs at other T or with packed input")
    group.add_argument("--sweep-budget", type=float, metavar="S", default=1.0,
                       help="seconds of interleaved rounds per shape; slow shapes stop at --sweep-min-rounds "
                            "(default 1.0)")
    group.add_argument("--sweep-stat", choices=tuple(STAT_TEXT), default="ratio",
                       help="what the heatmaps and the list of slow cells show: ratio (median of the per-round "
                            "ratios, the default) or ratio_best (fastest round against fastest round: less "
                            "sensitive to other processes on a shared machine); the CSV has both")
    group.add_argument("--sweep-clock", choices=("wall", "cpu"), default="wall",
                       help="wall: the wall clock (default); cpu: the process's CPU time, which on a machine "
                            "shared with busy processes leaves out the time they took; meant for --threads 1 "
                            "(with more threads it adds up every thread's time, spin-waits included)")
    group.add_argument("--sweep-min-rounds", type=int, metavar="N", default=2,
                       help="the fewest rounds a slow shape gets (default 2)")


def run(args) -> int:
    import torch

    from genfast.bench import machine, runner, timing

    require_matplotlib()  # before spending a quarter of an hour, not after
    cells = _names(args.sweep_cells, CELLS, "--sweep-cells")
    modes = _names(args.sweep_modes, MODES, "--sweep-modes")
    ns = _ints(args.sweep_n, GRID_N, "--sweep-n")
    hs = _ints(args.sweep_h, GRID_H, "--sweep-h")
    if args.sweep_min_rounds < 1 or args.sweep_budget < 0 or args.sweep_t < 1:
        raise SystemExit("--sweep-min-rounds and --sweep-t must be >= 1, --sweep-budget >= 0")
    todo = shapes(cells, modes, ns, hs, args.sweep_t, extras=not args.sweep_no_extras)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    header = machine.header("cpu", torch.get_num_threads())
    header["commit"] = machine.git_commit()
    header["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header["clock"] = args.sweep_clock
    timer = timing.ProcessTimeTimer() if args.sweep_clock == "cpu" else timing.CpuTimer()
    load, cores = header.get("load_avg"), header.get("cores") or 0
    if load is not None and cores and load > 0.75 * cores and args.sweep_clock == "wall":
        print(f"WARNING: load average {load} on {cores} cores: with the wall clock, a team of threads whose member "
              "is descheduled stalls at every step, and ratios swing by several times (docs/performance.md 2.4); "
              "--threads 1 --sweep-clock cpu leaves out the time other processes take", file=sys.stderr)
    if args.sweep_clock == "cpu" and header["threads"] > 1:
        print(f"--sweep-clock cpu with {header['threads']} threads: times add up every thread's CPU time, "
              "spin-waits included (use --threads 1)", file=sys.stderr)
    timing_plan = plan(args.sweep_budget, args.sweep_min_rounds)
    out_dir = Path(args.sweep_out)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "sweep.csv"
    print(f"sweep: {len(todo)} shapes, {header['cpu']}, {header['simd']}, {header['threads']} threads, "
          f"{args.sweep_clock} clock -> {out_dir}",
          flush=True)

    started = time.perf_counter()
    rows = []
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for index, shape in enumerate(todo):
            case = shape.case()
            result = runner.run_case(case, "cpu", timing_plan, peak_gflops=0.0, timer=timer)
            row = row_for(shape, result, header)
            rows.append(row)
            writer.writerow(row)
            handle.flush()  # a run that is cut short keeps what it measured
            what = (f"x{float(row['ratio']):.3f}, best x{float(row['ratio_best']):.3f} ({row['rounds']} rounds)"
                    if row["status"] == "ok" else
                    f"{row['status']}: {row['reason']}")
            print(f"[{index + 1}/{len(todo)} {time.perf_counter() - started:6.0f}s] {case.name}: {what}",
                  file=sys.stderr if args.no_progress else sys.stdout, flush=True)
    written = heatmaps(rows, out_dir, header, args.sweep_t, args.sweep_stat)

    stat = args.sweep_stat
    ok = [r for r in rows if r["status"] == "ok"]
    low = sorted((r for r in ok if float(r[stat]) < FLAG_BELOW), key=lambda r: float(r[stat]))
    print(f"\n{len(ok)}/{len(rows)} shapes measured; {stat} (torch.nn / genfast): "
          + (f"min {min(float(r[stat]) for r in ok):.3f}, median "
             f"{sorted(float(r[stat]) for r in ok)[len(ok) // 2]:.3f}" if ok else "none"))
    if low:
        print(f"below {FLAG_BELOW}x ({stat}):")
        for r in low:
            print(f"  {r['cell']} {r['mode']:9s} T={r['T']:>4} N={r['N']:>3} H={r['H']:>4}"
                  f"{' packed' if int(r['packed']) else ''}: x{float(r['ratio']):.3f} "
                  f"[{float(r['ratio_q1']):.3f}, {float(r['ratio_q3']):.3f}], best x{float(r['ratio_best']):.3f}")
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed:
        print(f"  not measured: {r['cell']} {r['mode']} T={r['T']} N={r['N']} H={r['H']}: {r['status']}: "
              f"{r['reason']}")
    print(f"CSV: {csv_path}")
    for path in written:
        print(f"heatmap: {path}")
    print(f"wall time: {time.perf_counter() - started:.1f}s")
    return 1 if failed else 0
