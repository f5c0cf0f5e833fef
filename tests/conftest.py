"""Shared fixtures: tiny corpora, a tiny BPE, tiny random models. No network, no hub."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

TINY_FILES = ["keyword.py", "bisect.py", "colorsys.py", "this.py", "glob.py", "fnmatch.py", "heapq.py",
              "stat.py", "numbers.py", "reprlib.py", "shlex.py", "sched.py", "string.py", "textwrap.py",
              "token.py", "tty.py", "getopt.py", "operator.py", "linecache.py", "genericpath.py"]


# Tiny models gain nothing from intra-op threads, and two OpenMP pools on two cores (pytest plus any background
# job) slow each other down by an order of magnitude.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Every test run caches tokenizers/tokens/models in a throwaway folder, never the user's."""
    old = os.environ.get("MSRNN_CACHE")
    os.environ["MSRNN_CACHE"] = str(tmp_path_factory.mktemp("msrnn-cache"))
    yield
    if old is None:
        os.environ.pop("MSRNN_CACHE", None)
    else:
        os.environ["MSRNN_CACHE"] = old


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of ~20 real stdlib modules (small, real code)."""
    from msrnn.data.corpus import stdlib_root

    root = tmp_path_factory.mktemp("corpus")
    for name in TINY_FILES:
        src = stdlib_root() / name
        if src.exists():
            shutil.copy(src, root / name)
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus: Path):
    from msrnn.data import load_documents, train_bpe

    return train_bpe((d.text for d in load_documents(str(tiny_corpus))), vocab_size=384)


@pytest.fixture
def tiny_model():
    from helpers import tiny

    return tiny("llama")


@pytest.fixture(scope="session")
def task_tokenizer(tiny_corpus: Path):
    """A tiny BPE that has also seen the task vocabulary, so the six places start with six different tokens (the
    plain 384-token code BPE splits 'bathroom' and 'bedroom' after the same ' b')."""
    from msrnn.data import load_documents, train_bpe
    from msrnn.tasks.templates import NAMES, PLACES

    words = " ".join(f"{n} went to the {p}. Where is {n}? Answer: {p}" for n in NAMES for p in PLACES)
    texts = [d.text for d in load_documents(str(tiny_corpus))] + [words] * 40
    return train_bpe(iter(texts), vocab_size=384)


@pytest.fixture(scope="session")
def task_model_dir(tmp_path_factory: pytest.TempPathFactory, task_tokenizer) -> Path:
    """A saved tiny random Llama with the task tokenizer: a model directory any command can load."""
    from helpers import tiny

    d = tmp_path_factory.mktemp("task-model") / "m"
    tiny("llama", seed=1).save_pretrained(d)
    task_tokenizer.save_pretrained(str(d))
    return d


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one mixed-precision setting per process; these tests change it, so they start and end with
    no Accelerator state (as a training command's own process does)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
