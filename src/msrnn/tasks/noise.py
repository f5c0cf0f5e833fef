"""Background noise for the memory tasks: English sentences, by default from the stdlib's docstrings.

The RMT report used QuALITY articles and BABILong uses PG-19 books; neither is available offline, so the default
is prose every Python install carries: module, class and function docstrings of the standard library (the same
~90/5/5 file split as the LM corpus, so evaluation noise is unseen in training). Any text the user names works too.
"""

from __future__ import annotations

import ast
import re

from msrnn.data.corpus import load_documents
from msrnn.errors import DataError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODEY = re.compile(r"[<>{}\[\]=_`|\\#@$*]|\(\)|::|\.\w+\(|\w\.\w")


def docstrings(source: str) -> list[str]:
    """Every module/class/function docstring of a Python source file (none if it does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                out.append(doc)
    return out


def prose_sentences(text: str, min_words: int = 5, max_chars: int = 300) -> list[str]:
    """Sentences of plain English in ``text``: code-looking fragments, doctests and headings are dropped."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        if ">>>" in para or para.lstrip().startswith(("-", "*", ":", "..")):
            continue
        para = " ".join(para.split())
        for sent in _SENTENCE_END.split(para):
            words = sent.split()
            if (len(words) >= min_words and len(sent) <= max_chars and sent[0].isupper()
                    and sent[-1] in ".!?" and not _CODEY.search(sent)):
                out.append(sent)
    return out


def noise_sentences(spec: str = "stdlib", split: str = "train", limit: int | None = None) -> list[str]:
    """Prose sentences of a data spec (``stdlib``, a folder, a file, a glob); docstrings for ``.py`` files.

    Raises :class:`DataError` when nothing usable is found, naming the fix.
    """
    if spec == "stdlib":
        docs = load_documents(f"stdlib:{split}")
    else:
        try:
            docs = load_documents(f"{spec}:{split}")
        except DataError:
            docs = load_documents(spec)  # too few files to split (e.g. one book): use all of it
    sentences: list[str] = []
    for doc in docs:
        texts = docstrings(doc.text) if doc.name.endswith(".py") else [doc.text]
        for t in texts:
            sentences.extend(prose_sentences(t))
            if limit and len(sentences) >= limit:
                return sentences[:limit]
    if not sentences:
        raise DataError(f"no English sentences found in noise source {spec!r}; name text files with prose "
                        "(e.g. --noise books/) or use the default stdlib docstrings")
    return sentences
