import hashlib
import logging

import numpy as np
import pytest

from msrnn.data import (
    LMBatches,
    cached_token_stream,
    load_documents,
    parse_data_spec,
    split_of,
    tokenize_documents,
)
from msrnn.data.corpus import SPLIT_FRACTIONS
from msrnn.errors import ConfigError, DataError


def test_parse_data_spec():
    assert parse_data_spec("stdlib:test") == parse_data_spec("stdlib:test")
    s = parse_data_spec("stdlib:test")
    assert (s.source, s.split) == ("stdlib", "test")
    assert parse_data_spec("stdlib").split == "all"
    assert parse_data_spec("stdlib", default_split="test").split == "test"
    h = parse_data_spec("hf:pg19:test")
    assert (h.source, h.name, h.split) == ("hf", "pg19", "test")
    p = parse_data_spec("some/dir:val")
    assert (p.source, p.name, p.split) == ("path", "some/dir", "val")
    assert parse_data_spec("notes:v2.txt").name == "notes:v2.txt"  # a colon that is not a split stays in the path
    # A named file or folder is used whole whatever the command's default split; stdlib keeps the default.
    assert parse_data_spec("notes.txt", default_split="test").split == "all"
    assert parse_data_spec("notes.txt:test", default_split="val").split == "test"
    from msrnn.data.corpus import training_specs

    assert [s and s.split for s in training_specs("notes.txt")] == ["all", None]
    assert [s.split for s in training_specs("notes.txt:train")] == ["train", "val"]
    assert [s.split for s in training_specs("stdlib")] == ["train", "val"]
    with pytest.raises(DataError, match="unknown split"):
        parse_data_spec("stdlib:bogus")
    with pytest.raises(DataError, match="empty data spec"):
        parse_data_spec("  ")


def test_split_is_a_stable_hash_of_the_relative_path():
    names = [f"pkg{i // 50}/mod{i}.py" for i in range(4000)]
    splits = [split_of(n) for n in names]
    assert splits == [split_of(n) for n in names]  # deterministic
    # Independent re-derivation from the documented rule (first 8 bytes of sha1, cumulative fractions).
    def ref(name):
        u = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") / 2**64
        return "train" if u < 0.90 else ("val" if u < 0.95 else "test")
    assert splits == [ref(n) for n in names]
    for name, frac in SPLIT_FRACTIONS.items():
        assert abs(splits.count(name) / len(names) - frac) < 0.02


def test_stdlib_splits_are_disjoint_and_cover_everything():
    sets = {s: {d.name for d in load_documents(f"stdlib:{s}")} for s in ("train", "val", "test")}
    everything = {d.name for d in load_documents("stdlib")}
    assert sets["train"] | sets["val"] | sets["test"] == everything
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["val"]) and not (sets["val"] & sets["test"])
    assert not any(n.startswith(("test/", "site-packages/")) for n in everything)


def test_non_utf8_files_are_skipped_with_a_count(tmp_path, caplog):
    (tmp_path / "good.txt").write_text("hello world\n")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa not utf8 \x80")
    with caplog.at_level(logging.WARNING):
        docs = load_documents(str(tmp_path))
    assert [d.name for d in docs] == ["good.txt"]
    assert "skipped 1 file" in caplog.text


def test_folder_documents_concatenate_in_sorted_order(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "b.py").write_text("B = 2\n")
    (tmp_path / "pkg" / "a.py").write_text("A = 1\n")
    (tmp_path / "top.py").write_text("T = 0\n")
    docs = {d.name: d.text for d in load_documents(str(tmp_path), unit="folder")}
    assert docs["pkg/"] == "A = 1\n\nB = 2\n"
    assert docs["./"] == "T = 0\n"


def test_glob_and_missing_and_empty(tmp_path):
    (tmp_path / "x.md").write_text("# x")
    (tmp_path / "y.txt").write_text("y")
    assert [d.name for d in load_documents(str(tmp_path / "*.md"))] == ["x.md"]
    with pytest.raises(DataError, match="does not exist"):
        load_documents(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no documents"):
        load_documents(str(empty))


def test_hf_source_without_datasets_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DataError, match="pip install 'msrnn\\[hf\\]'"):
        load_documents("hf:pg19:test")


def test_tokenizer_adds_no_special_tokens_and_round_trips(tiny_tokenizer):
    text = "def f(x):\n    return x + 1\n"
    ids = tiny_tokenizer(text)["input_ids"]
    assert tiny_tokenizer.eos_token_id not in ids
    assert tiny_tokenizer.decode(ids) == text
    assert len(tiny_tokenizer) == 384


def test_token_cache_hit_equals_fresh_tokenization(tiny_corpus, tiny_tokenizer, tmp_path):
    docs = load_documents(str(tiny_corpus))
    fresh = tokenize_documents(docs, tiny_tokenizer)
    first = cached_token_stream(docs, tiny_tokenizer, root=tmp_path)
    second = cached_token_stream(docs, tiny_tokenizer, root=tmp_path)
    assert isinstance(second.tokens, np.memmap)
    np.testing.assert_array_equal(np.asarray(first.tokens), fresh.tokens)
    np.testing.assert_array_equal(np.asarray(second.tokens), fresh.tokens)
    assert second.names == [d.name for d in docs]
    np.testing.assert_array_equal(second.doc(3), tiny_tokenizer(docs[3].text)["input_ids"])
    # Corrupt the cache: a clear error naming the folder to delete.
    (key,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (key / "tokens.bin").write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match="corrupt.*delete that folder"):
        cached_token_stream(docs, tiny_tokenizer, root=tmp_path)


def test_batches_deterministic_with_repeats(tiny_corpus, tiny_tokenizer):
    stream = tokenize_documents(load_documents(str(tiny_corpus)), tiny_tokenizer)
    b = LMBatches(stream, seq_len=64, batch_size=8, eos_id=0, repeat_fraction=0.25, seed=3)
    x, y = b.batch(5)["input_ids"], b.batch(5)["input_ids"]
    assert x.shape == (8, 64) and x.equal(y)
    assert not x.equal(b.batch(6)["input_ids"])
    assert not x.equal(b.batch(5, rank=1)["input_ids"])
    assert x[:2, :32].equal(x[:2, 32:])  # 2 of 8 rows repeat their first half
    assert not x[2:, :32].equal(x[2:, 32:])
    with pytest.raises(ConfigError):
        LMBatches(stream, seq_len=64, batch_size=8, eos_id=0, repeat_fraction=1.5)
    with pytest.raises(DataError, match="fewer than one sequence"):
        LMBatches(stream, seq_len=10**8, batch_size=1, eos_id=0)


def test_windows_are_read_from_the_token_file_and_equal_the_joined_stream():
    """LMBatches never builds the joined int64 corpus: each window is read document by document. Every window,
    across empty documents, boundaries and both ends, equals the same slice of the documents joined by EOS."""
    from msrnn.data.tokens import TokenStream

    rng = np.random.default_rng(0)
    lengths = [5, 0, 1, 9, 0, 0, 3, 12, 1]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(1, 500, int(offsets[-1])).astype(np.uint16)
    stream = TokenStream(tokens, offsets, [str(i) for i in range(len(lengths))])
    joined = np.insert(tokens, offsets[1:-1], 999).astype(np.int64)  # the array it used to build
    b = LMBatches(stream, seq_len=4, batch_size=1, eos_id=999)
    for start in range(len(joined)):
        for end in range(start, len(joined) + 1):
            np.testing.assert_array_equal(b.joined(start, end), joined[start:end])
    for step in range(20):  # the batches of a step are those the joined array gave
        rng = np.random.default_rng([b.seed, step, 0, 0])
        start = int(rng.integers(0, len(joined) - 4 + 1))
        np.testing.assert_array_equal(b.batch(step)["input_ids"][0].numpy(), joined[start : start + 4])


def _local_hf_dataset(root, n_train=40):
    """A datasets corpus in a local folder (jsonl files per split): what hf:NAME reads, without the Hub."""
    import json

    root.mkdir()
    with open(root / "train.jsonl", "w") as f:
        for i in range(n_train):
            f.write(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * (i % 4 + 1) if i % 7 else " "}) + "\n")
    with open(root / "validation.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"text": f"class C{i}:\n    pass\n"}) + "\n")
    return root


def test_hf_corpus_streams_into_the_token_cache(tmp_path, tiny_tokenizer, monkeypatch):
    """hf: corpora are read in datasets' streaming mode and tokenized batch by batch into the cache file: the
    result equals tokenizing the documents in memory, a second read maps the cache without streaming, and a changed
    dataset gets a new key."""
    pytest.importorskip("datasets")
    import os

    from msrnn.data import corpus, token_stream
    from msrnn.data import tokens as tokens_mod

    data = _local_hf_dataset(tmp_path / "ds")
    spec = f"hf:{data}:train"
    key, docs = corpus.document_stream(spec)
    assert not isinstance(docs, list) and next(docs).name == f"{data}/1"  # a lazy stream, not a list
    whole = load_documents(spec)
    assert len(whole) == 40 - 6  # the blank documents (every 7th) are left out
    monkeypatch.setattr(corpus, "load_documents", lambda *a, **k: pytest.fail("hf: must stream, not load whole"))
    real = tokens_mod._cached
    monkeypatch.setattr(tokens_mod, "_cached", lambda k, d, t, r, batch_docs=256: real(k, d, t, r, batch_docs=5))
    first = token_stream(spec, tiny_tokenizer, root=tmp_path / "cache")
    fresh = tokenize_documents(whole, tiny_tokenizer)
    np.testing.assert_array_equal(np.asarray(first.tokens), fresh.tokens)
    np.testing.assert_array_equal(first.offsets, fresh.offsets)
    assert first.names == [d.name for d in whole]

    def no_stream(*a, **k):
        raise AssertionError("a cached corpus is not streamed again")

    monkeypatch.setattr(tokens_mod, "encode_many", no_stream)
    again = token_stream(spec, tiny_tokenizer, root=tmp_path / "cache")
    assert isinstance(again.tokens, np.memmap) and again.offsets.tolist() == first.offsets.tolist()
    os.utime(data / "train.jsonl", (1, 1))  # the data changed: datasets' hash, and so the key, changes
    assert corpus.document_stream(spec)[0] != key


def test_pretrain_on_an_hf_corpus_streams_both_splits(tmp_path):
    pytest.importorskip("datasets")
    import json

    from msrnn.cli.main import main

    data = _local_hf_dataset(tmp_path / "ds", n_train=200)
    out = tmp_path / "m"
    assert main(["pretrain", "--preset", "tiny", "--data", f"hf:{data}", "--vocab-size", "300", "--max-steps", "2",
                 "--seq-len", "32", "--batch-size", "2", "--eval-every", "2", "--save-every", "0",
                 "--out", str(out), "--quiet"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert any("val_loss" in h for h in (history if isinstance(history, list) else history["history"]))
