"""Cross-build A/B: the same cases in this build (A) and another checkout's (B), alternating.

    python -m genfast.bench --ab ../other-checkout [--quick | --filter lstm.fastrnns] [--ab-rounds 3]

Each round runs the selected cases once in each build, each in a process of its own (two builds
of genfast._C cannot share a process): A then B in even rounds, B then A in odd ones, so slow drift
hits both alike. Every process runs this checkout's harness (ab_worker.py) against its build's
genfast and writes the usual JSON. The table gives, per case, genfast's ratio against a baseline
in each build (median over rounds of the in-process ratio, itself the median of per-round
ratios) and time A/B: the median over rounds of genfast's time in A over its time in B, from
processes run back to back (< 1: A is faster).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from genfast.bench import machine

WORKER = Path(__file__).with_name("ab_worker.py")


def build_root(path: str | os.PathLike) -> Path:
    """The directory holding a checkout's `genfast` package (what goes on PYTHONPATH)."""
    root = Path(path).resolve()
    if not (root / "genfast" / "__init__.py").is_file():
        raise ValueError(f"--ab: {root} holds no genfast/__init__.py (give the root of a genfast checkout)")
    return root


def this_root() -> Path:
    import genfast

    return Path(genfast.__file__).resolve().parents[1]


def _environment(root: Path) -> dict:
    """os.environ with PYTHONPATH = root first, without any other genfast checkout on it."""
    env = dict(os.environ)
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
            if p and not (Path(p) / "genfast" / "__init__.py").is_file()]
    env["PYTHONPATH"] = os.pathsep.join([str(root), *kept])
    return env


def worker_args(args, device: str, json_path: str) -> list[str]:
    forwarded = [f"--{args.set}", "--device", device, "--json", json_path, "--no-csv", "--no-progress",
                 "--no-peak"]
    if args.filter:
        forwarded += ["--filter", args.filter]
    if args.threads:
        forwarded += ["--threads", str(args.threads)]
    if args.compile_timeout is not None:
        forwarded += ["--compile-timeout", str(args.compile_timeout)]
    return forwarded


def run_worker(root: Path, argv: list[str]) -> dict:
    """One process of one build; returns its JSON document. Raises RuntimeError on failure."""
    with tempfile.TemporaryDirectory(prefix="genfast-ab-") as tmp:
        json_path = os.path.join(tmp, "run.json")
        argv = [a if a != "{json}" else json_path for a in argv]
        done = subprocess.run([sys.executable, str(WORKER), *argv], env=_environment(root), capture_output=True,
                              text=True)
        if done.returncode != 0 or not os.path.exists(json_path):
            raise RuntimeError(f"the worker for {root} failed (exit {done.returncode}):\n"
                               + "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:]))
        source = next((line.split(" ", 2)[2] for line in done.stdout.splitlines()
                       if line.startswith("genfast from ")), "")
        if Path(source).resolve() != (root / "genfast").resolve():
            raise RuntimeError(f"the worker for {root} imported genfast from {source!r}: is another copy "
                               "installed ahead of PYTHONPATH?")
        return json.loads(Path(json_path).read_text())


def _subject_and_baseline(case: dict) -> tuple[str | None, str | None]:
    subject = next(iter(case["speedups"]), None)
    baselines = list(case["speedups"].get(subject, {})) if subject else []
    return subject, (baselines[0] if baselines else None)


def aggregate(runs: dict[str, list[dict]]) -> list[dict]:
    """Per case: the subject and baseline compared, each build's median ratio and genfast time over
    rounds, and time A/B (median over rounds of A_i / B_i)."""
    rows = []
    first = runs["A"][0]
    for index, case in enumerate(first["cases"]):
        name = case["name"]
        per_build = {}
        for build in ("A", "B"):
            ratios, times = [], []
            for document in runs[build]:
                found = next((c for c in document["cases"] if c["name"] == name), None)
                subject, baseline = _subject_and_baseline(found) if found else (None, None)
                if subject is None or baseline is None:
                    ratios.append(None)
                    times.append(None)
                    continue
                ratios.append(found["speedups"][subject][baseline]["median"])
                times.append(found["providers"][subject]["stats_s"]["median"])
            per_build[build] = (ratios, times)
        subject, baseline = _subject_and_baseline(case)
        if subject is None:  # A could not run it: take the names from B if it could
            found = next((c for d in runs["B"] for c in d["cases"] if c["name"] == name and c["speedups"]), None)
            subject, baseline = _subject_and_baseline(found) if found else (None, None)
        row = {"case": name, "subject": subject, "baseline": baseline, "unit": case.get("unit", "ms")}
        for build in ("A", "B"):
            ratios, times = per_build[build]
            ok_ratios = [r for r in ratios if r is not None]
            ok_times = [t for t in times if t is not None]
            row[f"ratio_{build}"] = statistics.median(ok_ratios) if ok_ratios else None
            row[f"time_{build}_s"] = statistics.median(ok_times) if ok_times else None
            row[f"rounds_{build}"] = len(ok_ratios)
        pairs = [a / b for a, b in zip(per_build["A"][1], per_build["B"][1]) if a is not None and b]
        row["time_a_over_b"] = statistics.median(pairs) if pairs else None
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    from genfast.bench.report import UNIT_SCALE

    def number(value, fmt):
        return "-" if value is None else format(value, fmt)

    def duration(value, unit):
        return "-" if value is None else f"{value * UNIT_SCALE[unit]:.3g}{unit}"

    lines = [["case", "genfast path", "vs", "ratio A", "ratio B", "time A", "time B", "time A/B"]]
    for row in rows:
        lines.append([row["case"], row["subject"] or "-", row["baseline"] or "-",
                      number(row["ratio_A"], ".2f"), number(row["ratio_B"], ".2f"),
                      duration(row["time_A_s"], row["unit"]), duration(row["time_B_s"], row["unit"]),
                      number(row["time_a_over_b"], ".3f")])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
            for line in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)


def run(args, device: str, other: str) -> int:
    try:
        roots = {"A": this_root(), "B": build_root(other)}
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    if args.ab_rounds < 1:
        print(f"--ab-rounds must be >= 1, got {args.ab_rounds}", file=sys.stderr)
        return 2
    for build, root in roots.items():
        if not list((root / "genfast").glob("_C*.so")) and not list((root / "genfast").glob("_C*.pyd")):
            print(f"WARNING: build {build} ({root}) has no genfast/_C*.so next to its sources: its genfast paths "
                  "will show as 'not built' unless genfast._C is installed elsewhere on its path.", file=sys.stderr)
    argv = worker_args(args, device, "{json}")
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    started = time.perf_counter()
    for round_index in range(args.ab_rounds):
        for build in (("A", "B") if round_index % 2 == 0 else ("B", "A")):
            began = time.perf_counter()
            try:
                runs[build].append(run_worker(roots[build], argv))
            except RuntimeError as err:
                print(err, file=sys.stderr)
                return 1
            print(f"[ab] round {round_index + 1}/{args.ab_rounds}: build {build} in "
                  f"{time.perf_counter() - began:.1f}s", file=sys.stderr, flush=True)
    rows = aggregate(runs)
    header = runs["A"][0]["header"]
    print(f"genfast benchmark A/B ({args.set}{', --filter ' + args.filter if args.filter else ''}), "
          f"{args.ab_rounds} rounds, one process per build per round, alternating")
    for build, root in roots.items():
        print(f"  build {build}: {root} (commit {machine.git_commit(root)})")
    print(f"cpu: {header['cpu']}  threads: {header['threads']}  device: {header['device']}  torch {header['torch']}")
    print("ratio = median over rounds of baseline time / genfast time in that build (>1: genfast faster);")
    print("time A/B = median over rounds of genfast's time in A / in B (<1: build A faster).")
    print()
    print(table(rows))
    if args.json:
        from genfast.bench.report import write_json

        write_json(args.json, {"builds": {b: {"root": str(r), "commit": machine.git_commit(r)} for b, r in roots.items()},
                               "rounds": args.ab_rounds, "set": args.set, "filter": args.filter, "rows": rows,
                               "runs": runs})
        print(f"\nJSON: {args.json}")
    print(f"wall time: {time.perf_counter() - started:.1f}s")
    return 0
