"""The architecture stays visible: no family imports another family, the trainer or the evaluator, and the spine
below the families (evaluate, train, data, models, tasks' generators) imports no family."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "msrnn"
FAMILIES = {"kv": {"kv"}, "supra": {"supra"}, "ssm": {"ssm"}, "bst": {"bst", "ssm"}, "rmt": {"rmt"}}
UPPER = {"train", "evaluate", "studies", "build", "compare", "compare_report", "harness", "cli", "bench", "tasks"}


def imports(package: str) -> set[tuple[str, str]]:
    """(file, top-level msrnn subpackage) for every ``msrnn.*`` import in ``package``, lazy ones included."""
    out = set()
    for f in (SRC / package).rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "msrnn" and len(parts) > 1:
                    out.add((str(f.relative_to(SRC)), parts[1]))
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_imports_no_other_family_and_nothing_above_it(family):
    others = (set(FAMILIES) - FAMILIES[family]) | UPPER
    bad = sorted((f, target) for f, target in imports(family) if target in others)
    assert not bad, f"{family} reaches into {bad}"


@pytest.mark.parametrize("spine", ["evaluate", "train", "data", "models"])
def test_the_spine_imports_no_family(spine):
    allowed_lazy = {("models/loading.py", fam) for fam in FAMILIES}  # the family registry's lazy loaders
    bad = sorted(x for x in imports(spine) if x[1] in FAMILIES and x not in allowed_lazy)
    assert not bad, f"{spine} imports families: {bad}"


def test_every_family_record_resolves():
    """One record per family: its loader, hooks and modeling modules import, and buildable families have every
    hook a build calls, so the spine never needs a branch on a family name."""
    import importlib

    from transformers import AutoConfig

    from msrnn.families import BUILD_FAMILIES, COST_FAMILIES, FAMILIES

    assert set(COST_FAMILIES) == {"full", "kv", "supra", "bst", "rmt"} and set(BUILD_FAMILIES) == {"supra", "bst",
                                                                                                   "rmt"}
    for f in FAMILIES.values():
        hooks = f.module()
        assert callable(hooks.cost), f.name
        if f.loader:
            module, _, name = f.loader.partition(":")
            assert callable(getattr(importlib.import_module(module), name)), f.name
        if f.buildable:
            for hook in ("size_for_budget", "make", "as_lm", "load_trainable"):
                assert callable(getattr(hooks, hook)), (f.name, hook)
            knob, step, floor = hooks.SHRINK
            assert isinstance(knob, str) and step >= 1 and floor >= 1
        for model_type, module in zip(f.model_types, f.modeling, strict=True):
            importlib.import_module(module)
            AutoConfig.for_model(model_type)  # registered by that module
