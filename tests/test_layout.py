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


def test_every_family_spec_resolves():
    """One typed spec per family: it imports, its knobs build with their defaults, its cost model answers, and a
    family a build can make overrides every method a build calls, so no caller needs a branch on a family name."""
    import importlib

    from transformers import AutoConfig

    from msrnn.bench.costs import Arch
    from msrnn.families import FAMILIES, FamilySpec, build_families, cost_families
    from msrnn.models.presets import preset_config

    assert set(cost_families()) == {"full", "kv", "supra", "bst", "rmt"}
    assert set(build_families()) == {"supra", "bst", "rmt"}
    arch = Arch.from_config(preset_config("tiny", 256))
    for spec in FAMILIES.values():
        assert isinstance(spec, FamilySpec) and FAMILIES.get(spec.cost_label) is spec
        knobs = spec.knobs()
        assert set(spec.cost(arch, 64, knobs)) == {"flops", "state_bytes"}, spec.name
        if spec.trainable:
            for method in ("size_for_state_bytes", "make", "as_lm", "load", "load_trainable"):
                assert getattr(type(spec), method) is not getattr(FamilySpec, method), (spec.name, method)
            knob, step, floor = spec.shrink_step
            assert knob in spec.knob_names() and step >= 1 and floor >= 1
        for model_type, module in zip(spec.model_types, spec.modeling, strict=True):
            importlib.import_module(module)
            AutoConfig.for_model(model_type)  # registered by that module


# Where family names may be compared: the registry, and each family's own package and spec.
SPEC_HOMES = ("families.py", "models/family.py", "kv/", "supra/", "bst/", "ssm/", "rmt/")
FAMILY_NAMES = {"kv", "supra", "bst", "rmt", "hf"}  # "hf" (also a data source) and "full" (also a policy) count
# only where the comparison mentions a family
PROBED = {"wrapper", "final_logits", "backbone_kind"}  # attributes that were probed to guess a family


def _strings(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_strings(e) for e in node.elts)) if node.elts else set()
    return set()


def test_no_family_name_branches_outside_the_specs():
    """Callers ask a family's spec; they never compare a family name (or "full" against a family), test a saved
    model_type's prefix, or probe a model's attributes to guess its family."""
    bad = []
    for f in SRC.rglob("*.py"):
        rel = str(f.relative_to(SRC))
        if rel.startswith(SPEC_HOMES):
            continue
        source = f.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                names = set().union(*(_strings(x) for x in sides))
                text = ast.get_source_segment(source, node) or ""
                if names & FAMILY_NAMES - {"hf"} or (names & {"full", "hf"} and "family" in text):
                    bad.append(f"{rel}:{node.lineno}: {text}")
            elif isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)):
                func = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
                args = set().union(*(_strings(a) for a in node.args)) if node.args else set()
                if (func in ("hasattr", "getattr") and args & PROBED) or (func == "startswith" and any(
                        a.startswith("msrnn_") for a in args)):
                    bad.append(f"{rel}:{node.lineno}: {ast.get_source_segment(source, node)}")
    assert not bad, "family-name branches outside the specs:\n" + "\n".join(bad)


def test_tasks_hold_data_only():
    """``tasks/`` generates and reads task data; training on tasks lives in ``train/``."""
    bad = sorted((f, t) for f, t in imports("tasks") if t not in {"tasks", "data", "errors", "registry"})
    assert not bad, f"tasks imports {bad}"


def _module_graph() -> dict[str, set[str]]:
    """msrnn module -> the msrnn modules it imports (lazy imports inside functions too)."""
    mods = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f

    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("msrnn"):
                targets = [resolve(f"{node.module}.{a.name}") for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names if a.name.startswith("msrnn")]
            else:
                continue
            graph[m] |= {t for t in targets if t and t != m}
    return graph


def test_the_import_graph_has_no_circle():
    """No two msrnn modules import each other, directly or through others, lazy imports included (a circle is
    a layering mistake that a lazy import only hides)."""
    graph = _module_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_twins_are_named_one_way():
    """A slow, readable twin is ``<fast>_ref`` beside its fast function (and a flag that runs the twins is
    ``ref``), as mamba names ``selective_scan_ref``: no ``naive_*``, ``direct_*`` or ``*_reference`` functions."""
    bad = []
    for f in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = node.name.lstrip("_")
                if name.startswith(("naive_", "direct_")) or name.endswith("_reference"):
                    bad.append(f"{f.relative_to(SRC)}:{node.lineno} {node.name}")
                fast = node.name.removesuffix("_ref")
                if fast != node.name and not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                                                  and n.name == fast for n in ast.walk(ast.parse(f.read_text()))):
                    bad.append(f"{f.relative_to(SRC)}:{node.lineno} {node.name} has no {fast} beside it")
            elif isinstance(node, ast.arg) and node.arg == "reference":
                bad.append(f"{f.relative_to(SRC)}:{node.lineno} argument 'reference' (the twin flag is 'ref')")
    assert not bad, bad


def test_generated_docs_are_current():
    """The CLI reference comes from the parsers, and the results page and the figure blocks of README.md and the
    docs pages from docs/results/*.json: regenerate them (python scripts/docs_cli.py; python
    scripts/docs_results.py) when either changes."""
    import subprocess
    import sys

    root = SRC.parents[1]
    for script in ("scripts/docs_cli.py", "scripts/docs_results.py", "benchmarks/longctx_study.py"):
        r = subprocess.run([sys.executable, str(root / script), "--check"], capture_output=True, text=True,
                           timeout=300, cwd=root)
        assert r.returncode == 0, r.stderr


def test_training_commands_load_on_the_cpu():
    """A training command never puts the model on a device itself: it loads on the CPU and the trainer's Accelerator
    places it, each rank on its own device (loading on "auto" before the Accelerator exists put every rank's copy on
    cuda:0)."""
    bad = []
    for name in ("bst_cmds.py", "rmt_cmds.py", "supra_cmds.py", "longctx_train_cmds.py", "train_cmds.py"):
        source = (SRC / "cli" / name).read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.name.startswith(("run_train", "build_", "run_pretrain")):
                text = ast.get_source_segment(source, node) or ""
                if "resolve_device" in text or ".to(" in text or "device=" in text:
                    bad.append(f"{name}:{node.name}")
    assert not bad, bad


def test_measured_figures_in_the_docs_come_from_results_files():
    """A measured figure (a decimal, a decimal ratio or a percentage) appears in the README and the hand-written docs
    pages only inside a figure block that scripts/docs_results.py fills from docs/results, so no page quotes a number
    that its results file does not hold. Outside blocks: code, quotations, version numbers, settings such as needle
    depths, and targets (after "≥", "target", "at least") are not measurements."""
    import re

    root = SRC.parents[1]
    blocks = re.compile(r"<!-- figures: [\w-]+ -->.*?<!-- /figures -->", re.S)
    fence = re.compile(r"```.*?```", re.S)
    inline = re.compile(r"`[^`]*`|\"[^\"\n]*\"|\]\([^)\n]*\)")
    figure = re.compile(r"(?<![\w.\-/])\d[\d,]*\.\d+(?:x|%)?(?![\w.])|(?<![\w.\-/])\d+%")
    exempt = re.compile(r"(?:≥|<|>|target(?: of)?|at least|depths?|transformers|torch|kvpress|kernels|ERNIE|Llama|"
                        r"Python|lm-eval|version)\s*$")
    pages = [root / "README.md", *sorted(p for p in (root / "docs").rglob("*.md")
                                         if p.relative_to(root / "docs").parts[0] not in ("results", "reference"))]
    bad = []
    for page in pages:
        text = inline.sub(" ", fence.sub(" ", blocks.sub(" ", page.read_text())))
        for m in figure.finditer(text):
            before = text[max(0, m.start() - 14) : m.start()]
            if exempt.search(before) or m.group() in ("100%", "0%"):
                continue
            line = text[text.rfind("\n", 0, m.start()) + 1 : text.find("\n", m.end())]
            bad.append(f"{page.relative_to(root)}: {m.group()} in: {line.strip()[:100]}")
    assert not bad, "measured figures outside figure blocks (add a renderer to scripts/figures.py):\n" + \
        "\n".join(bad)
