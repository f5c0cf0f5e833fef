"""Memory tasks: facts land where the sample says, answers are right, noise and BABILong inputs are checked."""

import json
import random
import re

import pytest

from msrnn.errors import ConfigError, DataError
from msrnn.tasks import TASKS, TaskGenerator, babilong_samples, collate, noise_sentences
from msrnn.tasks.noise import prose_sentences
from msrnn.tasks.templates import PLACES

NOISE = ["The quick brown fox jumps over the lazy dog.", "A second sentence has a few more words in it.",
         "Short sentences are padding for the haystack here.", "This one ends the sample with a full stop."]


@pytest.fixture(scope="module")
def tok(task_tokenizer):
    return task_tokenizer


@pytest.mark.parametrize("task", ["memorize", "detect", "reasoning"])
@pytest.mark.parametrize("length", [100, 301, 1000])
def test_facts_and_question_are_where_the_sample_says(tok, task, length):
    gen = TaskGenerator(task, tok, NOISE)
    rng = random.Random(length)
    for _ in range(20):
        s = gen.sample(length, rng)
        assert len(s.input_ids) == length
        assert len(s.fact_spans) == len(s.facts) == (2 if task == "reasoning" else 1)
        for (a, b), fact in zip(s.fact_spans, s.facts, strict=True):
            assert tok.decode(s.input_ids[a:b]) == " " + fact
        starts = [a for a, _ in s.fact_spans]
        assert starts == sorted(starts) and s.fact_spans[-1][1] <= s.question_start
        assert tok.decode(s.input_ids[s.question_start :]) == f" {s.question} Answer:"
        if task == "memorize":
            assert s.fact_spans[0][0] == 0


def test_detect_puts_the_fact_at_varied_positions(tok):
    gen = TaskGenerator("detect", tok, NOISE)
    rng = random.Random(0)
    starts = {gen.sample(400, rng).fact_spans[0][0] for _ in range(60)}
    assert len(starts) > 10 and max(starts) > 200


def _solve(facts, question):
    """An independent reading of the templates: who is where, or which place is in a direction."""
    m = re.fullmatch(r"Where is (\w+)\?", question)
    if m:
        return next(re.search(r"the (\w+)\.$", f).group(1) for f in facts if f.startswith(m.group(1)))
    rel = [re.fullmatch(r"The (\w+) is (\w+) of the (\w+)\.", f).groups() for f in facts]
    opposite = {"north": "south", "south": "north", "east": "west", "west": "east"}
    m = re.fullmatch(r"What is (\w+) of the (\w+)\?", question)
    if m:  # "What is east of the X?" -> the place stated east of X
        return next(a for a, d, c in rel if d == m.group(1) and c == m.group(2))
    m = re.fullmatch(r"What is the (\w+) (\w+) of\?", question)  # "What is X east of?" -> the place west of X
    return next(a for a, d, c in rel if c == m.group(1) and d == opposite[m.group(2)])


@pytest.mark.parametrize("task", ["memorize", "reasoning"])
def test_labels_are_the_right_answers(tok, task):
    gen = TaskGenerator(task, tok, NOISE)
    rng = random.Random(1)
    seen = set()
    for _ in range(200):
        s = gen.sample(120, rng)
        assert PLACES[s.label] == _solve(s.facts, s.question)
        seen.add(s.label)
    assert len(seen) == len(PLACES)


def test_samples_are_reproducible_from_the_seed(tok):
    gen = TaskGenerator("reasoning", tok, NOISE)
    a = gen.sample(200, random.Random(7))
    b = gen.sample(200, random.Random(7))
    assert a.input_ids == b.input_ids and a.label == b.label


def test_label_first_tokens_are_distinct_or_a_clear_error(tok, tiny_tokenizer):
    ids = TaskGenerator("memorize", tok, NOISE).label_token_ids()
    assert len(set(ids)) == len(PLACES)
    with pytest.raises(ConfigError, match="share a first token"):
        TaskGenerator("memorize", tiny_tokenizer, NOISE).label_token_ids()


def test_bad_task_inputs(tok):
    with pytest.raises(ConfigError, match="unknown task 'qa99'.*memorize"):
        TaskGenerator("qa99", tok, NOISE)
    with pytest.raises(ConfigError, match="noise corpus is empty"):
        TaskGenerator("memorize", tok, [])
    with pytest.raises(ConfigError, match="too short"):
        TaskGenerator("reasoning", tok, NOISE).sample(10, random.Random(0))


def test_noise_keeps_prose_and_drops_code():
    text = "Return the sum of two numbers.\n\n>>> add(1, 2)\n3\n\nUse x.y = foo() to set it. It is ok to call."
    assert prose_sentences(text) == ["Return the sum of two numbers.", "It is ok to call."]


def test_noise_from_user_text_and_empty_source(tmp_path):
    (tmp_path / "book.txt").write_text("It was a bright cold day in April. The clocks were striking thirteen now.")
    assert noise_sentences(str(tmp_path / "book.txt")) == ["It was a bright cold day in April.",
                                                           "The clocks were striking thirteen now."]
    (tmp_path / "code.txt").write_text("x = 1\ny = 2\n")
    with pytest.raises(DataError, match="no English sentences"):
        noise_sentences(str(tmp_path / "code.txt"))


def test_collate_right_aligns(tok):
    gen = TaskGenerator("memorize", tok, NOISE)
    rng = random.Random(0)
    batch = collate([gen.sample(40, rng), gen.sample(70, rng)], pad_id=0)
    assert batch["input_ids"].shape == (2, 70)
    assert batch["attention_mask"][0].tolist() == [0] * 30 + [1] * 40
    assert batch["attention_mask"][1].all()


def test_babilong_loader(tok, tmp_path):
    rows = [{"input": "Mary went to the garden. Noise here.", "question": "Where is Mary?", "target": "garden"},
            {"input": "John moved to the office.", "question": "Where is John?", "target": "office"}]
    (tmp_path / "qa1.json").write_text(json.dumps({"qa1": rows}))
    samples, labels = babilong_samples(tmp_path / "qa1.json", tok, list(PLACES))
    assert labels == list(PLACES) and [s.label for s in samples] == [2, 3]
    assert tok.decode(samples[0].input_ids).endswith("Where is Mary? Answer:")
    (tmp_path / "qa1.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert [s.label for s in babilong_samples(tmp_path / "qa1.jsonl", tok)[0]] == [0, 1]  # labels from the file
    with pytest.raises(DataError, match="not in the label set"):
        babilong_samples(tmp_path / "qa1.jsonl", tok, ["kitchen"])
    (tmp_path / "bad.json").write_text(json.dumps([{"input": "x"}]))
    with pytest.raises(DataError, match="BABILong format"):
        babilong_samples(tmp_path / "bad.json", tok)
    with pytest.raises(DataError, match="does not exist"):
        babilong_samples(tmp_path / "none.json", tok)


def test_every_task_is_registered():
    assert TASKS.names() == ["detect", "memorize", "reasoning"]
