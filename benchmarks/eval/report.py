"""What a run says: each variant's scores, and its difference from the baseline (the first
variant) with a paired bootstrap 95% CI, over all tasks, per language and per kind of task.
The bootstrap resamples files whole: tasks cut from one file are not independent.

Records are read back from JSONL, so a report can be made from any run, and two runs compared
task by task (`compare`). The show gate's trade-off is computed from the same records
(`gate_rows`): the gate ran in shadow, so each floor on the model's confidence can be tried
after the fact."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ghostpen.benchmarks.eval.run import Record
from ghostpen.server.stats import Difference, paired_bootstrap, proportion

# (name, how a record scores on it, or None where the record is not judged on it)
METRICS = (
    ("exact_match", lambda r: r.exact),
    ("edit_similarity", lambda r: r.edit_similarity),
    ("identifier_f1", lambda r: r.identifier_f1),
    ("pass_at_1", lambda r: None if r.passed is None else float(r.passed)),
    ("recall_at_k", lambda r: float(r.recalled) if r.oracle else None),
    ("prompt_tokens", lambda r: float(r.prompt_tokens)),  # the cost: reading it is the latency
)

JUDGED = ("pass_at_1", "recall_at_k")  # scored on some tasks only: the table says how many

KEPT_SIMILARITY = 0.8  # a suggestion this close to what the author wrote counts as one kept
CONFIDENCE_FLOORS = (-1.5, -1.0, -0.75, -0.5, -0.35, -0.25, -0.15)  # mean token log-probability


def read_records(path: Path) -> list[Record]:
    with path.open(encoding="utf-8") as lines:
        return [Record(**json.loads(line)) for line in lines if line.strip()]


def groups(records: Sequence[Record]) -> list[tuple[str, list[Record]]]:
    """All tasks, then each language, then each kind, when there is more than one. Then, when
    only some tasks need a definition another open file holds, those tasks (CrossCodeEval's
    selection, where context can matter) overall and per language."""
    found = [("all", list(records))]
    found += _split(records, "language") + _split(records, "kind")
    needing = [r for r in records if r.oracle]
    if needing and len(needing) < len(records):
        found.append(("needs context", needing))
        found += [(f"needs context: {v}", mine) for v, mine in _split(needing, "language")]
    return found


def _split(records: Sequence[Record], field: str) -> list[tuple[str, list[Record]]]:
    values = sorted({getattr(r, field) for r in records})
    if len(values) < 2:
        return []
    return [(v, [r for r in records if getattr(r, field) == v]) for v in values]


def summary(records: Sequence[Record], variants: Sequence[str]) -> list[dict[str, object]]:
    """A row per group and variant: its mean per metric, and for all but the baseline the
    difference from it on the same tasks, with its CI."""
    rows = []
    for group, mine in groups(records):
        by_variant: dict[str, dict[str, Record]] = defaultdict(dict)
        for record in mine:
            by_variant[record.variant][record.task_id] = record
        baseline = by_variant.get(variants[0], {})
        for variant in variants:
            scored = by_variant.get(variant, {})
            row: dict[str, object] = {"group": group, "variant": variant, "tasks": len(scored)}
            for metric, score in METRICS:
                values = [v for r in scored.values() if (v := score(r)) is not None]
                row[metric] = round(sum(values) / len(values), 4) if values else None
                row[f"{metric}_tasks"] = len(values)
                if variant == variants[0] or not values:
                    continue
                pairs = [
                    (a, b, r.file)
                    for task_id, r in scored.items()
                    if task_id in baseline
                    and (b := score(r)) is not None
                    and (a := score(baseline[task_id])) is not None
                ]
                if pairs:
                    row[f"{metric}_diff"] = _difference(pairs).describe()
            rows.append(row)
    return rows


def markdown(rows: Sequence[dict[str, object]], variants: Sequence[str]) -> str:
    """Means per variant, then the differences from the baseline, a table each."""
    present = [m for m, _ in METRICS if any(row[f"{m}_tasks"] for row in rows)]
    judged = [f"{m}_tasks" for m in present if m in JUDGED]
    header = ["group", "variant", "tasks", *present, *judged]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [_cell(row[h]) for h in header]
        lines.append("| " + " | ".join(cells) + " |")
    if len(variants) > 1:
        lines += ["", f"Differences from `{variants[0]}` (paired bootstrap by file, 95% CI):", ""]
        header = ["group", "variant", *present]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            if row["variant"] != variants[0]:
                cells = [str(row["group"]), str(row["variant"])]
                cells += [str(row.get(f"{m}_diff", "")) for m in present]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gate_rows(records: Sequence[Record], variants: Sequence[str]) -> list[dict[str, object]]:
    """Per variant and rule, what the show gate shows: precision is the share of the shown
    suggestions that would be kept (edit similarity >= KEPT_SIMILARITY), recall the share of the
    keepable ones that are shown, each with its 95% interval. Rules: no gate; the gate's text
    checks (blank, closers, repeats); those and each confidence floor."""

    def text_checks(r: Record) -> bool:
        return r.withheld in ("", "unsure")

    rules: list[tuple[str, Callable[[Record], bool]]] = [
        ("no gate", lambda r: True),
        ("blank, closers, repeats", text_checks),
    ]
    rules += [
        (
            f"... and confidence >= {floor}",
            lambda r, f=floor: text_checks(r) and (r.confidence is None or r.confidence >= f),
        )
        for floor in CONFIDENCE_FLOORS
    ]
    rows = []
    for variant in variants:
        mine = [
            r
            for r in records
            if r.variant == variant and r.predicted and r.edit_similarity is not None
        ]
        keepable = sum(_kept(r) for r in mine)
        for rule, shows in rules:
            shown = [r for r in mine if shows(r)]
            kept = sum(_kept(r) for r in shown)
            rows.append(
                {
                    "variant": variant,
                    "rule": rule,
                    "shown": f"{len(shown)} of {len(mine)}",
                    "precision": proportion(kept, len(shown)).describe(),
                    "recall": proportion(kept, keepable).describe(),
                }
            )
    return rows


def gate_markdown(rows: Sequence[dict[str, object]]) -> str:
    header = ["variant", "rule", "shown", "precision", "recall"]
    lines = [
        f"The show gate (kept: edit similarity >= {KEPT_SIMILARITY}; Wilson 95% CIs):",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(str(row[h]) for h in header) + " |" for row in rows]
    return "\n".join(lines)


def _kept(record: Record) -> bool:
    return (record.edit_similarity or 0.0) >= KEPT_SIMILARITY


def compare(a: Iterable[Record], b: Iterable[Record]) -> list[dict[str, object]]:
    """Two runs, task by task: for each variant both ran, b's scores minus a's with CIs."""
    first = {(r.variant, r.task_id): r for r in a}
    second = {(r.variant, r.task_id): r for r in b}
    rows = []
    for variant in sorted({v for v, _ in first} & {v for v, _ in second}):
        keys = [k for k in first if k[0] == variant and k in second]
        row: dict[str, object] = {"variant": variant, "tasks": len(keys)}
        for metric, score in METRICS:
            pairs = [
                (x, y, first[k].file)
                for k in keys
                if (x := score(first[k])) is not None and (y := score(second[k])) is not None
            ]
            if pairs:
                row[metric] = _difference(pairs).describe()
        rows.append(row)
    return rows


def _difference(pairs: Sequence[tuple[float, float, str]]) -> Difference:
    """(before, after, file) of each task: after - before, resampled by file."""
    before, after, files = zip(*pairs, strict=True)
    return paired_bootstrap(before, after, clusters=files)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)
