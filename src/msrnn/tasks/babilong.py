"""Samples from BABILong files (Kuratov et al., 2024) when the user has them.

Accepts the hosted JSON layouts: a list of ``{"input", "question", "target"}`` objects, a JSON-lines file of them,
or a dict of such lists keyed by task (``{"qa1": [...]}``, pick one with ``task``). The label set is the given one
(e.g. the six places of qa1-qa4) or, by default, every distinct target in the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from msrnn.errors import DataError
from msrnn.tasks.samples import ANSWER_PROMPT, TaskSample, encode_many


def read_babilong(path: str | Path, task: str | None = None) -> list[dict[str, str]]:
    """The samples of a BABILong JSON / JSON-lines file (one task), validated."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"BABILong file {path} does not exist; download e.g. RMT-team/babilong's qa1 split as JSON")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text (a binary file?); pass a BABILong JSON file") from None
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is neither JSON nor JSON lines ({exc}); pass a BABILong JSON file") from None
    if isinstance(data, dict):
        if task is None:
            if len(data) != 1:
                raise DataError(f"{path} holds tasks {sorted(data)}; choose one with --babilong-task")
            task = next(iter(data))
        if task not in data:
            raise DataError(f"{path} has no task {task!r}; it holds {sorted(data)}")
        data = data[task]
    rows = [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []
    if not rows or len(rows) != len(data) or any(not {"input", "question", "target"} <= set(r) for r in rows):
        raise DataError(f"{path} is not in BABILong format: every sample needs input, question and target fields")
    for i, r in enumerate(rows):
        bad = [k for k in ("input", "question", "target") if not isinstance(r[k], str)]
        if bad:
            raise DataError(f"{path}: sample {i} has non-text {', '.join(bad)} ({type(r[bad[0]]).__name__}); "
                            "BABILong fields are strings")
    return rows


def babilong_samples(path: str | Path, tokenizer: Any, labels: list[str] | None = None,
                     task: str | None = None) -> tuple[list[TaskSample], list[str]]:
    """BABILong samples tokenized as task samples with labels among the file's answers."""
    rows = read_babilong(path, task)
    labels = labels or sorted({r["target"].strip() for r in rows})
    unknown = sorted({r["target"].strip() for r in rows} - set(labels))
    if unknown:
        raise DataError(f"targets {unknown[:5]} are not in the label set {labels}; pass the task's labels")
    inputs = encode_many(tokenizer, [r["input"] for r in rows])
    questions = encode_many(tokenizer, [f" {r['question'].strip()} {ANSWER_PROMPT}" for r in rows])
    samples = [TaskSample(i + q, labels.index(r["target"].strip()), [], len(i))
               for i, q, r in zip(inputs, questions, rows, strict=True)]
    return samples, labels
