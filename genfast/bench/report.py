"""Turning results into the printed table, JSON, the CSV log and the speedup chart."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path

from genfast.bench.runner import CaseResult, ProviderResult

UNIT_SCALE = {"ms": 1e3, "us": 1e6}
CSV_HEADER_COLUMNS = ("date", "commit", "cpu", "cores", "simd", "threads", "torch", "genfast", "device")
CSV_COLUMNS = CSV_HEADER_COLUMNS + (
    "case", "op", "mode", "provider", "role", "status", "reason", "median_s", "q1_s", "q3_s", "min_s", "max_s",
    "rounds", "gflops", "pct_peak", "peak_memory_bytes", "genfast_speedup", "flops")


def _time(seconds: float, unit: str) -> str:
    value = seconds * UNIT_SCALE[unit]
    return f"{value:.1f}{unit}" if value >= 10 else f"{value:.2f}{unit}"


def _mem(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes / 2**20:.1f}MB" if nbytes < 2**30 else f"{nbytes / 2**30:.2f}GB"


def _short(text: str, width: int = 80) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[:width - 3] + "..."


def _cell(p: ProviderResult, unit: str, with_peak: bool = True) -> str:
    if not p.ok:
        return p.status
    text = _time(p.stats.median, unit)
    if with_peak and p.pct_peak:  # none for cases without a flop count
        text += f" {p.pct_peak:.0f}%"
    return text


def _render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 or i == len(r) - 1 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def table(results: list[CaseResult]) -> str:
    """One table per provider kind (the columns differ); one row per case and genfast path."""
    blocks = []
    for kind in dict.fromkeys(r.case.kind for r in results):
        group = [r for r in results if r.case.kind == kind]
        baseline_names = list(dict.fromkeys(b for r in group for b in r.case.baselines))
        memory = any(r.case.measure_memory for r in group)
        head = ["case", "genfast path", "time", "±IQR", "GFLOP/s", "%peak"] + (["mem"] if memory else [])
        for b in baseline_names:
            head += [b] + (["mem"] if memory else []) + [f"x{b}"]
        head.append("notes")
        rows = [head]
        for r in group:
            unit = r.case.unit
            for index, subject in enumerate(r.subjects()):
                first = index == 0
                row = [r.case.name if first else "", subject.name]
                if subject.ok:
                    row += [_time(subject.stats.median, unit), f"{100 * subject.stats.relative_iqr:.0f}%",
                            f"{subject.gflops:.1f}" if subject.gflops else "-",
                            f"{subject.pct_peak:.0f}%" if subject.pct_peak else "-"]
                else:
                    row += [subject.status, "", "", ""]
                if memory:
                    row.append(_mem(subject.peak_memory_bytes) if subject.ok else "")
                for b in baseline_names:
                    p = r.providers.get(b)
                    if p is None:
                        row += ["", *([""] if memory else []), ""]
                        continue
                    row.append(_cell(p, unit) if first else "")
                    if memory:
                        row.append(_mem(p.peak_memory_bytes) if first and p.ok else "")
                    ratio = r.speedups.get(subject.name, {}).get(b)
                    row.append(f"{ratio.median:.2f}" if ratio else "-")
                row.append("; ".join(_notes(r, subject, first)))
                rows.append(row)
        blocks.append(_render(rows))
    return "\n\n".join(blocks)


def _notes(r: CaseResult, subject: ProviderResult, first: bool) -> list[str]:
    notes = []
    if not subject.ok:
        notes.append(f"{subject.name}: {_short(subject.reason)}")
    if subject.ok and subject.first_call_s is not None and r.case.timer == "do_bench":
        notes.append(f"first call (autotunes) {subject.first_call_s:.1f}s")
    diff = r.checks.get("max_abs_diff", {})
    for key, value in diff.items():
        if key.startswith(subject.name + " "):
            notes.append(f"max|diff| {value:.1e}")
    if first:
        loss = r.checks.get("loss_after_steps")
        if loss:
            notes.append(f"loss after {loss['steps']} steps: genfast {loss['genfast']:.6f} "
                         f"torch {loss['torch']:.6f} |diff| {loss['abs_diff']:.1e}")
        if "identical_tokens" in r.checks:
            notes.append("identical tokens" if r.checks["identical_tokens"] else "TOKENS DIFFER")
        rates = [f"{k.removesuffix('_tokens_per_s')} {v:.1f} tok/s" for k, v in r.checks.items()
                 if k.endswith("_tokens_per_s")]
        notes += rates
        if "genfast_weight_GBps" in r.checks:
            copy = r.checks.get("copy_GBps_read_plus_write")
            notes.append(f"weights streamed {r.checks['genfast_weight_GBps']:.1f} GB/s"
                         + (f" (copy r+w {copy:.1f} GB/s)" if copy else ""))
        for b in r.baselines():
            if not b.ok:
                notes.append(f"{b.name}: {b.status} ({_short(b.reason, 60)})")
    return notes


def header_text(header: dict, peak: dict, plan, set_name: str, other_peaks: dict | None = None) -> str:
    lines = [
        f"genfast benchmark ({set_name})  {header['date']}  commit {header['commit']}",
        f"cpu: {header['cpu']}  cores: {header['cores']}  simd: {header['simd']}  threads: {header['threads']}"
        f"  device: {header['device']}" + (f" ({header['gpu']})" if header['device'] == "cuda" else ""),
        f"torch {header['torch']}  genfast {header['genfast']}  python {header['python']}",
        f"peak ({peak['dtype']} GEMM, best over {peak['rounds']} rounds of {len(peak['all'])} shapes/kernels): "
        f"{peak['gflops']:.1f} GFLOP/s from {peak['source']}",
        "  by method: " + ", ".join(f"{method} {value:.1f}" for method, value in peak.get("by_method", {}).items())
        + f"  (probe: {peak.get('probe', '-')})",
        *(f"peak ({p['dtype']} GEMM): {p['gflops']:.1f} GFLOP/s from {p['source']}"
          for p in (other_peaks or {}).values() if p is not peak),
        f"timing: warm-up, then >= {plan.min_rounds} interleaved rounds (A B .. B A ..); time = median per call,"
        f" ±IQR = interquartile range / median;",
        "x<baseline> = median over rounds of baseline/genfast time (>1: genfast faster); %peak = GFLOP/s / peak.",
    ]
    if header["device"] == "cuda":
        lines.append("CUDA: TF32 off (float32 means IEEE fp32 products on every side); times from CUDA events, "
                     "or Triton's do_bench (L2 flushed) where a case says so.")
    load, cores = header.get("load_avg"), header.get("cores") or 0
    if header["device"] == "cpu" and load is not None and cores and load > 0.75 * cores:
        lines.append(f"WARNING: load average {load} on {cores} cores at start: other processes compete for the "
                     "CPUs, so times are inflated and noisy (ratios, taken round by round, suffer least).")
    return "\n".join(lines)


def _stats_dict(stats) -> dict | None:
    return None if stats is None else stats.as_dict()


def to_json(header: dict, peak: dict, plan, set_name: str, results: list[CaseResult]) -> dict:
    cases = []
    for r in results:
        cases.append({
            "name": r.case.name, "op": r.case.op, "kind": r.case.kind, "mode": r.case.mode,
            "params": r.case.params, "flops": r.case.flops, "unit": r.case.unit,
            "providers": {p.name: {
                "role": p.role, "status": p.status, "reason": p.reason, "samples_s": p.samples,
                "stats_s": _stats_dict(p.stats), "gflops": p.gflops, "pct_peak": p.pct_peak,
                "peak_memory_bytes": p.peak_memory_bytes, "first_call_s": p.first_call_s}
                for p in r.providers.values()},
            "speedups": {s: {b: _stats_dict(st) for b, st in per.items()} for s, per in r.speedups.items()},
            "checks": r.checks, "wall_s": r.wall_s,
        })
    return {"header": header, "peak": peak, "set": set_name, "plan": dataclasses.asdict(plan), "cases": cases}


def write_json(path: str | os.PathLike, document: dict) -> None:
    def clean(value):  # JSON has no NaN/inf
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(clean(document), indent=1))


def append_csv(path: str | os.PathLike, header: dict, results: list[CaseResult]) -> int:
    """Append one line per case per provider; writes the column names when the file is new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    lines = 0
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for r in results:
            first_subject = next(iter(r.speedups), None)
            for p in r.providers.values():
                ratio = r.speedups.get(first_subject, {}).get(p.name) if first_subject else None
                row = {k: header[k] for k in CSV_HEADER_COLUMNS}
                row.update(case=r.case.name, op=r.case.op, mode=r.case.mode, provider=p.name, role=p.role,
                           status=p.status, reason=_short(p.reason, 200), rounds=len(p.samples),
                           gflops=p.gflops, pct_peak=p.pct_peak, peak_memory_bytes=p.peak_memory_bytes,
                           genfast_speedup=ratio.median if ratio else None, flops=r.case.flops)
                if p.stats:
                    row.update(median_s=p.stats.median, q1_s=p.stats.q1, q3_s=p.stats.q3,
                               min_s=p.stats.min, max_s=p.stats.max)
                writer.writerow(row)
                lines += 1
    return lines


def plot(path: str | os.PathLike, results: list[CaseResult], title: str) -> None:
    """Bar chart: for each case, genfast's speedup over each baseline (log scale, 1 = parity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(r.case.name, f"{subject} vs {baseline}", stats)
            for r in results for subject, per in r.speedups.items() for baseline, stats in per.items()]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(bars) + 2), 5))
    if bars:
        labels = [f"{case}\n{pair}" for case, pair, _ in bars]
        medians = [s.median for _, _, s in bars]
        errors = [[s.median - s.q1 for _, _, s in bars], [s.q3 - s.median for _, _, s in bars]]
        colors = ["tab:green" if m >= 1 else "tab:red" for m in medians]
        ax.bar(range(len(bars)), medians, yerr=errors, color=colors, capsize=2)
        ax.set_xticks(range(len(bars)), labels, rotation=90, fontsize=6)
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel("speedup (baseline time / genfast time)")
    else:
        ax.text(0.5, 0.5, "no speedups: no genfast path was built\n(see the table's notes)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
