"""Task evaluation scores every family the same way; RMT task training runs the curriculum and resumes it."""

import random

import pytest
import torch
from helpers import tiny

from msrnn.evaluate.tasks import TaskEvalConfig, evaluate_task
from msrnn.models.hf import HFCausalLM
from msrnn.rmt import RMTLM, MemoryWrapper
from msrnn.tasks import TaskGenerator
from msrnn.tasks.templates import PLACES
from msrnn.train.curriculum import Curriculum, CurriculumConfig

NOISE = ["The quick brown fox jumps over the lazy dog.", "A second sentence has a few more words in it."]


class OracleLM:
    """Reads the stream like a model would and answers from the decoded text: a perfect reader."""

    def __init__(self, tok, label_ids):
        self.tok, self.label_ids, self.vocab_size = tok, label_ids, len(tok)

    def init_state(self, batch_size):
        return [[] for _ in range(batch_size)]

    def forward_chunk(self, ids, state):
        for row, seen in zip(ids.tolist(), state, strict=True):
            seen.extend(row)
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab_size)
        for b, seen in enumerate(state):
            text = self.tok.decode(seen)
            name = text.rsplit("Where is ", 1)[-1].split("?")[0]
            place = text.split(f"{name} ", 1)[1].split(".")[0].rsplit(" ", 1)[-1] if f"{name} " in text else ""
            if place in PLACES:
                logits[b, -1, self.label_ids[PLACES.index(place)]] = 1.0
        return logits, state

    def state_nbytes(self, state):
        return 8 * sum(len(s) for s in state)


def test_a_perfect_reader_scores_one_and_a_random_model_near_chance(task_tokenizer):
    gen = TaskGenerator("detect", task_tokenizer, NOISE)
    cfg = TaskEvalConfig(samples=24, batch_size=8, chunk_size=50)
    rows = evaluate_task(OracleLM(task_tokenizer, gen.label_token_ids()), gen, [200, 400], cfg)
    assert [r["accuracy"] for r in rows] == [1.0, 1.0]
    assert rows[1]["peak_state_bytes"] == 2 * rows[0]["peak_state_bytes"]  # grows with length, per sequence
    w = MemoryWrapper.wrap(tiny("llama", seed=1), num_memory_tokens=2, segment_length=50).eval()
    rows = evaluate_task(RMTLM(w), gen, [200, 400], cfg)
    assert all(0 <= r["accuracy"] <= 0.6 for r in rows)
    # The peak is memory plus the current segment's keys/values (not the memory alone that chunk ends see), and
    # constant in length: the state at every offset, as measure_state_bytes gives it.
    from msrnn.protocol import measure_state_bytes

    in_segment = measure_state_bytes(RMTLM(w), 400)
    assert rows[0]["peak_state_bytes"] == rows[1]["peak_state_bytes"] == in_segment > 2 * 64 * 4
    full = evaluate_task(HFCausalLM(tiny("llama", seed=1)), gen, [200, 400], cfg)
    assert full[1]["peak_state_bytes"] == 2 * full[0]["peak_state_bytes"]


def test_curriculum_advances_on_threshold_and_budget_and_stops_at_max():
    c = Curriculum(CurriculumConfig(max_segments=3, threshold=0.9, stage_steps=100))
    assert c.update(10, {"val_acc": 0.5}) == {"segments": 1}
    assert c.update(20, {"val_acc": 0.95}) == {"segments": 2}
    assert c.update(119, {"val_acc": 0.1})["segments"] == 2
    assert c.update(120, {"val_acc": 0.1})["segments"] == 3  # 100 steps at stage 2
    assert c.update(500, {"val_acc": 1.0})["segments"] == 3
    assert [e["reason"] for e in c.log] == ["threshold", "step budget"]
    d = Curriculum(CurriculumConfig(max_segments=3))
    d.load_state_dict(c.state_dict())
    assert d.stage == 3 and d.log == c.log
    segs = d.segments_for_batch(random.Random(0), 200)
    assert set(segs) == {1, 2, 3} and segs.count(3) > 80


def test_train_task_runs_the_curriculum_and_resumes_it(tmp_path, task_tokenizer):
    from msrnn.families import FAMILIES
    from msrnn.train import TrainConfig
    from msrnn.train.tasks import TaskTrainConfig, train_task

    def run(steps, resume):
        w = MemoryWrapper.wrap(tiny("llama", seed=1), num_memory_tokens=2, segment_length=96)
        cfg = TrainConfig(max_steps=steps, eval_every=2, save_every=2, warmup_steps=1, lr=1e-3)
        return train_task(w, task_tokenizer, FAMILIES.get("rmt"),
                          TaskTrainConfig(task="memorize", batch_size=2, val_samples=4),
                          CurriculumConfig(max_segments=3, stage_steps=1), cfg, tmp_path / "rmt", {},
                          resume=resume, progress=False)

    trainer, result = run(4, False)
    assert trainer.curriculum.stage == 3  # a 1-step budget per stage: every validation advances
    assert [h["segments"] for h in result.history if "segments" in h] == [2, 3]
    resumed, _ = run(6, True)
    assert resumed.curriculum.stage == 3 and resumed.curriculum.log == trainer.curriculum.log
    from transformers import AutoModel

    saved = AutoModel.from_pretrained(tmp_path / "rmt")
    assert saved.config.task == "memorize" and saved.config.label_names == list(PLACES)


def test_every_rank_draws_rank_zeros_segment_counts_on_its_own_samples(tmp_path, task_tokenizer):
    """A sharded model gathers each layer's weights at every call, so all ranks must run the same number of
    segments: rank r's batch has rank 0's shape (its segment counts) and its own samples; rank 0's are unchanged."""
    from msrnn.families import FAMILIES
    from msrnn.train import TrainConfig
    from msrnn.train.tasks import CurriculumSchedule, TaskTrainConfig, train_on_task

    w = MemoryWrapper.wrap(tiny("llama", seed=1), num_memory_tokens=2, segment_length=96)
    curriculum = Curriculum(CurriculumConfig(max_segments=4, start=4))  # counts drawn from 1..4
    trainer = train_on_task(w, task_tokenizer, FAMILIES.get("rmt"), TaskTrainConfig(task="memorize", batch_size=3),
                            96, CurriculumSchedule(curriculum), TrainConfig(max_steps=1, eval_every=0),
                            tmp_path / "r", {}, progress=False)
    shapes = set()
    for step in range(12):
        ranks = [trainer.batch_fn(step, 0, r) for r in range(3)]
        assert len({tuple(b["input_ids"].shape) for b in ranks}) == 1, step
        assert not torch.equal(ranks[0]["input_ids"], ranks[1]["input_ids"])
        shapes.add(tuple(ranks[0]["input_ids"].shape))
    assert len(shapes) > 1  # the counts do vary from step to step


@pytest.mark.parametrize("bad", [{"max_segments": 2, "start": 3}, {"threshold": 0}, {"stage_steps": -1}])
def test_bad_curriculum(bad):
    from msrnn.errors import ConfigError

    with pytest.raises(ConfigError):
        CurriculumConfig(**bad)


@pytest.fixture(scope="module")
def base_dir(task_model_dir):
    return task_model_dir


def test_cli_train_rmt_then_eval_task_json(base_dir, tmp_path, capsys):
    import json

    from msrnn.cli.main import main

    out = tmp_path / "rmt"
    rc = main(["train", "rmt", "--from", str(base_dir), "--task", "memorize", "--out", str(out), "--memory", "2",
               "--segment-length", "96", "--max-segments", "2", "--stage-steps", "1", "--max-steps", "2",
               "--eval-every", "1", "--batch-size", "2", "--json", "--quiet"])
    assert rc == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["final_segments"] == 2 and trained["task"] == "memorize"
    rc = main(["eval", "task", "--model", str(out), "--segments", "1,3", "--samples", "4", "--json", "--quiet"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["task"] == "memorize" and res["segment_length"] == 96
    assert [(r["segments"], r["tokens"]) for r in res["results"]] == [(1, 96), (3, 288)]
    assert all(set(r) >= {"segments", "tokens", "accuracy", "peak_state_bytes"} for r in res["results"])
    # Memory (2 x 64 fp32) plus, at the segment's last offset, keys/values of 2 memory + 95 tokens (512 B each).
    peak = 2 * 64 * 4 + (2 + 95) * 2 * 2 * 2 * 16 * 4
    assert res["results"][0]["peak_state_bytes"] == res["results"][1]["peak_state_bytes"] == peak
    # The same samples scored through a KV policy on the base model: state bounded by the budget.
    rc = main(["eval", "task", "--model", str(base_dir), "--task", "memorize", "--segments", "1,3",
               "--segment-length", "96", "--samples", "4", "--policy", "window", "--budget", "32", "--json",
               "--quiet"])
    assert rc == 0
    kv = json.loads(capsys.readouterr().out)["results"]
    assert kv[0]["peak_state_bytes"] == kv[1]["peak_state_bytes"]


@pytest.mark.parametrize("argv,msg", [
    (["--task", "qa99"], "unknown task 'qa99'"),
    (["--segment-length", "8"], "cannot hold"),
    (["--noise", "EMPTY"], "no English sentences"),
])
def test_cli_train_rmt_bad_input(base_dir, tmp_path, capsys, argv, msg):
    from msrnn.cli.main import main

    (tmp_path / "empty.txt").write_text("x = 1\n")
    argv = [a.replace("EMPTY", str(tmp_path / "empty.txt")) for a in argv]
    rc = main(["train", "rmt", "--from", str(base_dir), "--out", str(tmp_path / "o"), "--max-steps", "1",
               "--quiet", *argv])
    assert rc == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "o" / "msrnn.json").exists()


def test_cli_zero_memory_and_eval_without_task(base_dir, capsys):
    from msrnn.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["train", "rmt", "--from", str(base_dir), "--out", "x", "--memory", "0"])
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    assert main(["eval", "task", "--model", str(base_dir), "--segment-length", "96"]) == 2
    assert "name one with --task" in capsys.readouterr().err
    assert main(["eval", "task", "--model", str(base_dir), "--task", "memorize"]) == 2
    assert "--segment-length is required" in capsys.readouterr().err


def test_rmt_task_answers_are_scored_on_the_segments_training_used(task_tokenizer):
    """T = 21 with S = 8: training's final_logits front-pads so the last segment ends on the answer; streaming
    cuts 8, 8, 5 from the start. The task scorer must use training's boundaries (the two differ)."""
    from msrnn.tasks.samples import TaskSample

    gen = TaskGenerator("detect", task_tokenizer, NOISE)
    label_ids = gen.label_token_ids()
    w = MemoryWrapper.wrap(tiny("llama", seed=3), num_memory_tokens=2, segment_length=8, bptt_depth=-1).eval()
    lm = RMTLM(w)
    g = torch.Generator().manual_seed(0)
    samples = [TaskSample(torch.randint(0, 300, (21,), generator=g).tolist(), label=i % 6) for i in range(12)]
    ids = torch.tensor([s.input_ids for s in samples])
    with torch.no_grad():
        trained = w.final_logits(ids)
        state = lm.init_state(len(samples))
        streamed, _ = lm.forward_chunk(ids, state)
    assert (trained - streamed[:, -1]).abs().max() > 1e-3  # the boundaries really differ at T % S != 0
    want = trained[:, label_ids].argmax(-1).tolist()
    by_stream = streamed[:, -1][:, label_ids].argmax(-1).tolist()
    for s, label in zip(samples, by_stream, strict=True):
        s.label = label  # a scorer that streams would get every answer "right"
    rows = evaluate_task(lm, gen, [21], TaskEvalConfig(samples=12, batch_size=5, chunk_size=4), samples={21: samples})
    agree = sum(a == b for a, b in zip(want, by_stream, strict=True)) / 12
    assert rows[0]["accuracy"] == agree < 1.0
    # and at T % S == 0 the two agree, so streaming results at whole segments stand
    whole = ids[:, :16]
    with torch.no_grad():
        a = w.final_logits(whole)
        b, _ = lm.forward_chunk(whole, lm.init_state(len(samples)))
    assert torch.allclose(a, b[:, -1], atol=1e-4)
