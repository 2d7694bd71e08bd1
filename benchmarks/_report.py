"""Tables of results and of ratios against diffrax and the hand-written scan."""

from __future__ import annotations

# Targets for diffeqx, as ratios: diffeqx / diffrax, and diffeqx / lax.scan.
TARGETS = {"compile": 0.5, "run": 0.8, "steps": 1.0, "run_vs_scan": 1.2}

_RATIO_FIELDS = (("compile", "compile_s"), ("compile_cpu", "compile_cpu_s"))
_RATIO_FIELDS += (("run", "run_ms"),)
_RATIO_FIELDS += (("steps", "steps"), ("fevals", "fevals"))


def _ratio(numerator: dict | None, denominator: dict | None, field: str):
    if numerator is None or denominator is None:
        return None
    top, bottom = numerator.get(field), denominator.get(field)
    if top is None or bottom is None or bottom == 0:
        return None
    return top / bottom


def ratio_rows(records: list[dict], problems) -> list[dict]:
    """Per problem: diffeqx / diffrax for each measure, and run times vs the scan."""
    by_key = {(r["problem"], r["library"]): r for r in records if "error" not in r}
    rows = []
    for problem in problems:
        ours = by_key.get((problem.key, "diffeqx"))
        theirs = by_key.get((problem.key, "diffrax"))
        scan = by_key.get((problem.key, "scan"))
        row = {"problem": problem.key}
        for name, field in _RATIO_FIELDS:
            row[name] = _ratio(ours, theirs, field)
        row["run_vs_scan"] = _ratio(ours, scan, "run_ms")
        row["diffrax_run_vs_scan"] = _ratio(theirs, scan, "run_ms")
        targets = {**TARGETS, "compile_cpu": TARGETS["compile"]}
        row["meets_targets"] = {
            name: row[name] <= target
            for name, target in targets.items()
            if row.get(name) is not None
        }
        rows.append(row)
    return rows


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _milliseconds(value) -> str:
    if value is None:
        return "-"
    return (
        f"{value:.3f}"
        if value < 10
        else f"{value:.1f}"
        if value < 1e3
        else f"{value:.0f}"
    )


def _count(value) -> str:
    return "-" if value is None else str(value)


def _times(value, target=None) -> str:
    if value is None:
        return "-"
    text = f"{value:.2f}x"
    if target is not None:
        text += " ok" if value <= target else " MISS"
    return text


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(
        cell.ljust(width) if i < 2 else cell.rjust(width)
        for i, (cell, width) in enumerate(zip(row, widths, strict=True))
    )
    print(line(header))
    print("-" * len(line(header)))
    for row in rows:
        print(line(row))


def print_report(records: list[dict], problems, info: dict) -> None:
    titles = {p.key: p.title for p in problems}
    if "lotka_volterra_vmap" in titles:
        titles["lotka_volterra_vmap"] += f" x{info['batch_size']}"
    print()
    print(
        f"Results ({info['dtype']}, {info['backend']}: {info['device']}; "
        f"jax {info['jax']}; total {info['wall_s']:.0f} s)"
    )
    header = ["problem", "library", "trace s", "compile s", "cpu s", "run ms", "steps"]
    header += ["acc/rej", "fevals", "rel diff"]
    rows, errors = [], []
    for record in records:
        title = titles[record["problem"]]
        if "error" in record:
            rows.append([title, record["library"], *["FAILED"] + ["-"] * 7])
            errors.append(f"{title} [{record['library']}]: {record['error']}")
            continue
        relative = record.get("rel_diff")
        rows.append(
            [
                title,
                record["library"],
                _seconds(record["lower_s"]),
                _seconds(record["compile_s"]),
                _seconds(record["compile_cpu_s"]),
                _milliseconds(record["run_ms"]),
                _count(record["steps"]),
                f"{record['accepted']}/{record['rejected']}",
                _count(record["fevals"]),
                "-" if relative is None else f"{relative:.1e}",
            ]
        )
    _print_table(header, rows)
    print(
        "trace s: trace + lower; compile s: trace + lower + XLA compile (wall, min "
        "over repeats, cold caches); cpu s: process CPU time of the same (steadier "
        "on a busy machine); run ms: median steady run. steps, acc/rej, fevals: "
        "summed over the batch in (c); fevals: executed vector-field calls (in (d): "
        "forward and backward pass; under vmap one call per batched evaluation). "
        "rel diff: max|y - y_ref| / max|y_ref| against diffrax ((e): against the scan)."
    )
    for line in errors:
        print("  " + line)

    ratio_table = ratio_rows(records, problems)
    if not any(row["compile"] or row["run_vs_scan"] for row in ratio_table):
        return
    print()
    print("Ratios (diffeqx / diffrax unless stated; 'ok' meets the target)")
    header = ["problem", "", "compile", "compile cpu", "run", "steps", "fevals"]
    header += ["diffeqx/scan run", "diffrax/scan run"]
    rows = [
        [
            titles[row["problem"]],
            "",
            _times(row["compile"], TARGETS["compile"]),
            _times(row["compile_cpu"], TARGETS["compile"]),
            _times(row["run"], TARGETS["run"]),
            _times(row["steps"], TARGETS["steps"]),
            _times(row["fevals"]),
            _times(row["run_vs_scan"], TARGETS["run_vs_scan"]),
            _times(row["diffrax_run_vs_scan"]),
        ]
        for row in ratio_table
    ]
    target = lambda name: f"<= {TARGETS[name]:.2f}x"
    rows.append(
        ["target", "", target("compile"), target("compile"), target("run")]
        + [target("steps"), "-"]
        + [target("run_vs_scan"), "-"]
    )
    _print_table(header, rows)
