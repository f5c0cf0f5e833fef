"""Regenerate every state-size figure the README quotes from the code, and check the README against them.

State bytes (and the sizes fitted to a byte budget) depend on a model's shape, not on its weights, so each
figure is rebuilt here from an untrained model of the same configuration as the README's command and measured
the way msrnn measures it (``measure_state_bytes``: the state at every offset, one token at a time; "between
segments" where the README says so). Parameter counts of the BST table are checked the same way.

    python benchmarks/readme_state_bytes.py            # the figures as a table
    python benchmarks/readme_state_bytes.py --check    # exit 1, naming each one, if the README quotes another
    python benchmarks/readme_state_bytes.py --json

``tests/test_readme_figures.py`` runs ``--check``, so a code change that moves a figure fails CI until the README
says what the code does.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def published_text() -> str:
    """The README and the documentation's hand-written pages (the generated results and references quote the JSON
    and the parsers, not these figures): where the figures are quoted."""
    pages = [README] + sorted(p for p in (ROOT / "docs").rglob("*.md")
                              if p.relative_to(ROOT / "docs").parts[0] not in ("results", "reference"))
    return "\n".join(p.read_text() for p in pages)
VOCAB = 4096  # the stdlib BPE every README model uses


@dataclass
class Figure:
    name: str
    compute: Callable[[], str]  # the figure as the README writes it
    pattern: str  # a regex over the README with one group: where the figure is quoted


def _n(x: int) -> str:
    return f"{x:,}"


@cache
def _small():
    from msrnn.models.presets import build_model

    torch.manual_seed(0)
    return build_model("small", VOCAB).eval()


# ---------------------------------------------------------------- BST (train bst --preset small --seq-len 256)
@cache
def _bst(variant: str, kernel: str):
    from msrnn.bst import BSTLM, BSTConfig, BSTForCausalLM
    from msrnn.protocol import measure_state_bytes

    W = 256 // 8
    cfg = BSTConfig.from_preset("small", VOCAB, block_size=W, variant=variant, kernel=kernel, state_size=16,
                                mf_states=8, ssm_layers=None, filter_length=256)
    model = BSTForCausalLM(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    return params, measure_state_bytes(BSTLM(model), tokens=3 * W + 1)  # SLIDE's peak needs two whole blocks


BST_ROWS = {"SLIDE": ("slide", "s4"), "BST:SH:S4": ("sh", "s4"), "BST:MH:S4": ("mh", "s4"),
            "BST:MF:S4": ("mf", "s4"), "BST:SH:UNSTRUCT": ("sh", "unstruct")}


def _bst_figures() -> list[Figure]:
    out = []
    for row, (variant, kernel) in BST_ROWS.items():
        r = re.escape(row)
        out += [
            Figure(f"BST table (300 steps): {row} params", lambda v=variant, k=kernel: f"{_bst(v, k)[0] / 1e6:.2f}M",
                   rf"\n\| {r} \| ([\d.]+M) \|"),
            Figure(f"BST table (300 steps): {row} state bytes", lambda v=variant, k=kernel: _n(_bst(v, k)[1]),
                   rf"\n\| {r} \| [\d.]+M \|[^\n]*\| ([\d,]+) \| [\d,]+ s \|"),
        ]
    for row in ("SLIDE", "BST:SH:S4", "BST:MH:S4"):
        v, k = BST_ROWS[row]
        out.append(Figure(f"BST table (900 steps): {row} state bytes", lambda v=v, k=k: _n(_bst(v, k)[1]),
                          rf"\n\| {re.escape(row)} \(900\) \|[^\n]*\| ([\d,]+) \| [\d,]+ s \|"))
    return out


# ---------------------------------------------------------------- RMT (train rmt --segment-length 128 --memory 8)
@cache
def _rmt_decoder() -> tuple[int, int]:
    import copy

    from msrnn.protocol import measure_state_bytes
    from msrnn.rmt import MemoryWrapper
    from msrnn.rmt.lm import RMTLM

    lm = RMTLM(MemoryWrapper.wrap(copy.deepcopy(_small()), num_memory_tokens=8, segment_length=128).eval())
    state = lm.init_state(1)
    with torch.inference_mode():
        _, state = lm.forward_chunk(torch.zeros(1, 128, dtype=torch.long), state)  # one whole segment
    return lm.state_nbytes(state), measure_state_bytes(lm, tokens=2 * 128)


def _rmt_encoder() -> str:
    from types import SimpleNamespace

    from transformers import BertConfig, BertModel

    from msrnn.protocol import tensor_nbytes
    from msrnn.rmt.encoder import MemoryEncoderClassifier

    # all-MiniLM-L6-v2's width (384) with 10 memory tokens; the classifier's state between segments is its memory
    bert = BertModel(BertConfig(vocab_size=64, hidden_size=384, num_hidden_layers=1, num_attention_heads=12,
                                intermediate_size=64), add_pooling_layer=False)
    tok = SimpleNamespace(cls_token_id=1, sep_token_id=2, pad_token_id=0)
    clf = MemoryEncoderClassifier.wrap(bert, tok, ["a", "b"], num_memory_tokens=10, segment_length=64)
    return _n(tensor_nbytes(clf.memory))


def _rmt_stream() -> str:
    # bench stream --family rmt: 16 memory tokens of the small model's width, read between 512-token segments
    return _n(16 * _small().config.hidden_size * 4)


# ---------------------------------------------------------------- SUPRA and the budget fits (demo, compare)
def _supra() -> str:
    import copy

    from msrnn.protocol import measure_state_bytes
    from msrnn.supra import SupraLM, convert

    return _n(measure_state_bytes(SupraLM(convert(copy.deepcopy(_small()))), tokens=4))


@cache
def _fit(family: str, budget: int) -> tuple[dict[str, int], int]:
    from msrnn.build import fit

    knobs, nbytes = fit(family, _small(), budget)
    return knobs.sizing(), nbytes


@cache
def _slots(policy: str, budget: int) -> tuple[int, int]:
    from msrnn.build import fit
    from msrnn.compare import KV_PREFILL
    from msrnn.families import FAMILIES

    kv = FAMILIES.get("kv")
    knobs, nbytes = fit(kv.name, _small(), budget, kv.knobs(policy=policy, prefill=KV_PREFILL))
    return knobs.budget, nbytes


def _fit_figures() -> list[Figure]:
    out = [
        Figure("demo: KV (window/TOVA) bytes at 256 KiB", lambda: _n(_slots("window", 262_144)[1]),
               r"measured state bytes ([\d,]+) \(KV\)"),
        Figure("demo: RMT bytes at 256 KiB", lambda: _n(_fit("rmt", 262_144)[1]), r"\(KV\), ([\d,]+)\n?\s*\(RMT\)"),
        Figure("demo: BST bytes at 256 KiB", lambda: _n(_fit("bst", 262_144)[1]), r"\(RMT\), ([\d,]+) \(BST\)"),
        Figure("demo: SUPRA bytes at 256 KiB", lambda: _n(_fit("supra", 262_144)[1]), r"\(BST\) and ([\d,]+) \(SUPRA"),
    ]
    for label, b in (("64 KiB", 65_536), ("256 KiB", 262_144), ("1 MiB", 1_048_576)):
        row = rf"\n\| {re.escape(label)} \|"
        out += [
            Figure(f"compare {label}: KV window slots", lambda b=b: f"{_slots('window', b)[0]} slots",
                   row + r"[^\n]*?\(([\d]+ slots)\)"),
            Figure(f"compare {label}: RMT sizing", lambda b=b: "S={segment_length}, m={num_memory_tokens}".format(
                **_fit("rmt", b)[0]), row + r"[^\n]*?\((S=\d+, m=\d+)\)"),
            Figure(f"compare {label}: BST block", lambda b=b: f"W={_fit('bst', b)[0]['block_size']}",
                   row + r"[^\n]*?\((W=\d+)"),
            Figure(f"compare {label}: SUPRA features", lambda b=b: f"F={_fit('supra', b)[0]['feature_dim']}",
                   row + r"[^\n]*?\((F=\d+)\)"),
        ]
    return out


FIGURES: list[Figure] = [
    *_bst_figures(),
    Figure("RMT decoder: state between segments", lambda: _n(_rmt_decoder()[0]),
           r"decoder:\n?\s*([\d,]+) bytes = 8 x 256 fp32"),
    Figure("RMT decoder: peak inside a segment", lambda: _n(_rmt_decoder()[1]),
           r"peak inside a segment with its keys and values ([\d,]+) bytes"),
    Figure("RMT encoder (MiniLM, 10 memory tokens)", _rmt_encoder, r"encoder: ([\d,]+) bytes"),
    Figure("bench stream: RMT (16 mem, 512 seg) between segments", _rmt_stream,
           r"\| RMT \(16 mem, 512 seg\) \|(?:[^|\n]*\|){5} ([\d,]+) \|"),
    Figure("SUPRA (small, d x d per head)", _supra, r"\| SUPRA \(lightning decay\) \|(?:[^|\n]*\|){5} ([\d,]+) \|"),
    *_fit_figures(),
]


def run(check: bool) -> tuple[list[dict[str, str]], list[str]]:
    from rich.progress import track

    text = published_text()
    rows, problems = [], []
    for f in track(FIGURES, description="figures", console=None, transient=True):
        value = f.compute()
        found = re.findall(f.pattern, text)
        quoted = found[0] if len(found) == 1 else None
        rows.append({"figure": f.name, "code": value, "README": quoted or f"({len(found)} matches)"})
        if check and quoted != value:
            why = f"README quotes {quoted}" if quoted else f"pattern matched {len(found)} times, not once"
            problems.append(f"{f.name}: code gives {value}, {why}")
    return rows, problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if any README figure differs from the code")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows, problems = run(check=True)
    if args.json:
        print(json.dumps({"figures": rows, "problems": problems}, indent=2))
    else:
        from msrnn.ui import out_console, table

        out_console.print(table("README state figures", ["figure", "code", "README"],
                                [[r["figure"], r["code"], r["README"]] for r in rows]))
    if args.check and problems:
        for line in problems:
            print(f"readme_state_bytes: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
