"""Long-context probes (#29): seeded generators with exact lengths and depths, scoring through the protocol for every
family, needle retention, and one context answering many questions exactly as reading it anew would."""

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import tiny

from msrnn.errors import ConfigError
from msrnn.tasks.longctx import LONGCTX_TASKS, LongCtxGenerator


@pytest.fixture(scope="module")
def haystack():
    from msrnn.tasks.noise import noise_sentences

    return noise_sentences("stdlib", "test", limit=400)


@pytest.mark.parametrize("task", LONGCTX_TASKS.names())
def test_samples_have_exact_lengths_depths_and_answers(task, task_tokenizer, haystack):
    gen = LongCtxGenerator(task, task_tokenizer, haystack)
    for length in (700, 1500):
        for depth in (0.0, 0.4, 1.0):
            p = gen.sample(length, depth, random.Random(7))
            assert len(p.input_ids) == p.length == length
            again = gen.sample(length, depth, random.Random(7))
            assert again.input_ids == p.input_ids and again.label == p.label  # reproducible from the seed
            assert " ".join(p.answers) in p.candidates[p.label].replace(",", "")  # the true candidate is marked
            assert len(set(p.candidates)) == len(p.candidates) == 8
            q = task_tokenizer.decode(p.input_ids[p.question_start:])
            assert q.strip().endswith(("is", "are", "are:", "they are:"))
            if not gen.task.uses_depth:
                assert p.depth is None and not p.needle_spans
                continue
            # The first needle starts at the depth's token position in the haystack (exact, not snapped).
            hay = length - (length - p.question_start) - sum(b - a for a, b in p.needle_spans)
            start = p.needle_spans[0][0] - sum(b - a for a, b in p.needle_spans[1:] if b <= p.needle_spans[0][0])
            assert start == round(depth * hay)
            for (a, b), v in zip(p.value_spans, p.answers, strict=False):
                assert task_tokenizer.decode(p.input_ids[a:b]).strip() == v  # retention looks at these tokens


def test_bad_lengths_and_depths_are_refused(task_tokenizer, haystack):
    gen = LongCtxGenerator("vt", task_tokenizer, haystack)
    with pytest.raises(ConfigError, match="cannot hold"):
        gen.sample(40, 0.5, random.Random(0))
    with pytest.raises(ConfigError, match="fraction in"):
        LongCtxGenerator("passkey", task_tokenizer, haystack).sample(500, 1.5, random.Random(0))
    with pytest.raises(ConfigError, match="unknown long-context task"):
        LongCtxGenerator("needle", task_tokenizer, haystack)


def _families(tok):
    """A StatefulLM of every family around tiny random models (KV with exact prefill)."""
    from msrnn.bst import BSTLM, from_llama
    from msrnn.kv import KVSettings, apply_kv
    from msrnn.models import HFCausalLM
    from msrnn.rmt import RMTLM, MemoryWrapper
    from msrnn.supra import SupraLM, convert

    base = tiny("llama", seed=3)
    full = HFCausalLM(base, tokenizer=tok)
    return {"full": full, "tova": apply_kv(full, KVSettings("tova", 24)),
            "supra": SupraLM(convert(tiny("llama", seed=3), feature_dim=8)),
            "bst": BSTLM(from_llama(tiny("llama", seed=3), block_size=16, state_size=4).eval()),
            "rmt": RMTLM(MemoryWrapper.wrap(tiny("llama", seed=3), num_memory_tokens=2, segment_length=16).eval())}


@pytest.mark.parametrize("family", ["full", "tova", "supra", "bst", "rmt"])
def test_one_context_many_questions_equals_reading_each_from_scratch(family, task_tokenizer):
    from msrnn.generate import answer_questions, generate

    lm = _families(task_tokenizer)[family]
    g = torch.Generator().manual_seed(0)
    context = torch.randint(3, 300, (1, 61), generator=g)
    questions = [torch.randint(3, 300, (1, n), generator=g) for n in (5, 9, 1)]
    fed = []
    forward = lm.forward_chunk

    def counting(ids, state):
        fed.append(ids.shape[1])
        return forward(ids, state)

    lm.forward_chunk = counting
    answers = answer_questions(lm, context, questions, max_new_tokens=6, prefill_chunk=16)
    read_tokens = sum(fed)
    lm.forward_chunk = forward
    # The context is read once: every token fed is context (once), a question, or an answer token.
    assert read_tokens == 61 + sum(q.shape[1] for q in questions) + 3 * 5
    for q, a in zip(questions, answers, strict=True):
        scratch = generate(lm, torch.cat([context, q], dim=1), max_new_tokens=6, prefill_chunk=16)
        assert a.tolist() == scratch.tolist(), family


def test_needle_retention_follows_the_policy(task_tokenizer, haystack):
    """A window keeps the newest tokens: a needle at depth 1 is held when the question is read, one at depth 0 is
    long gone; the full cache keeps everything and reports no retention (its state keeps every token anyway)."""
    from msrnn.evaluate.longctx import LongCtxConfig, evaluate_longctx
    from msrnn.kv import KVSettings, apply_kv
    from msrnn.models import HFCausalLM

    full = HFCausalLM(tiny("llama", seed=1), tokenizer=task_tokenizer)
    window = apply_kv(full, KVSettings("window", 96))
    gen = LongCtxGenerator("passkey", task_tokenizer, haystack)
    cfg = LongCtxConfig(samples=2, chunk_size=64)
    rows = {r["depth"]: r for r in evaluate_longctx(window, gen, [600], [0.0, 1.0], cfg)}
    assert rows[1.0]["retention"] == 1.0 and rows[0.0]["retention"] == 0.0
    assert len(rows[0.0]["retention_by_layer"]) == full.model.config.num_hidden_layers
    assert rows[0.0]["peak_state_bytes"] < evaluate_longctx(full, gen, [600], [0.0], cfg)[0]["peak_state_bytes"]
    for r in rows.values():
        assert r["chance"] == 1 / 8 and 0 <= r["rank_acc"] <= 1 and 0 <= r["exact"] <= r["recall"] <= 1
    assert evaluate_longctx(full, gen, [600], [0.0], cfg)[0]["retention"] is None


def test_a_model_that_knows_the_answer_scores_it(task_tokenizer, haystack):
    """An oracle that reads the prompt and puts all its probability on the pass key's next digit token scores exact
    match and rank accuracy 1: the scorer reads what the model says, not something else."""
    from msrnn.evaluate.longctx import LongCtxConfig, evaluate_longctx

    tok = task_tokenizer

    class Oracle:
        vocab_size = len(tok)

        def init_state(self, batch_size):
            return [{"ids": [], "asked_at": None} for _ in range(batch_size)]

        def forward_chunk(self, ids, state):
            logits = torch.full((ids.shape[0], ids.shape[1], self.vocab_size), -20.0)
            for b, row in enumerate(ids.tolist()):
                st = state[b]
                for t, token in enumerate(row):
                    st["ids"].append(token)
                    text = tok.decode(st["ids"])
                    if st["asked_at"] is None and text.endswith("What is the pass key? The pass key is"):
                        st["asked_at"] = len(st["ids"])
                    if st["asked_at"] is None:
                        continue
                    key = text.split("The pass key is ")[1].split(".")[0]
                    answer = tok(" " + key, add_special_tokens=False)["input_ids"]
                    said = st["ids"][st["asked_at"]:]
                    if said == answer[: len(said)] and len(said) < len(answer):
                        logits[b, t, answer[len(said)]] = 20.0
            return logits, state

        def state_nbytes(self, state):
            return 0

    gen = LongCtxGenerator("passkey", tok, haystack)
    rows = evaluate_longctx(Oracle(), gen, [300], [0.5], LongCtxConfig(samples=3, chunk_size=50))
    assert rows[0]["rank_acc"] == 1.0 and rows[0]["exact"] == 1.0 and rows[0]["retention"] is None


def test_cli_eval_longctx_and_ask(task_model_dir, tmp_path, capsys):
    from msrnn.cli.main import main

    assert main(["eval", "longctx", "--model", str(task_model_dir), "--tasks", "passkey,cwe", "--lengths", "300",
                 "--depths", "0,1", "--samples", "1", "--policy", "window", "--budget", "64", "--out",
                 str(tmp_path / "lc"), "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [(r["task"], r["depth"]) for r in res["rows"]] == [("passkey", 0.0), ("passkey", 1.0), ("cwe", None)]
    assert res["rows"][1]["retention"] == 1.0
    for name in ("heatmap_passkey.png", "heatmap_cwe.png", "accuracy_vs_length.png"):
        assert (tmp_path / "lc" / name).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "lc" / "results.json").read_text())["rows"][0]["task"] == "passkey"
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("Mary went to the garden. John went to the office. " * 20)
    assert main(["ask", "--model", str(task_model_dir), "--context", str(ctx), "--question", "Where is Mary?",
                 "--question", "Where is John?", "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [a["question"] for a in out["answers"]] == ["Where is Mary?", "Where is John?"]
    assert out["context_tokens"] > 100
    for argv, message in ((["--depths", "2"], "fractions in"), (["--tasks", "needle"], "unknown long-context task"),
                          (["--lengths", "30", "--tasks", "vt"], "cannot hold")):
        assert main(["eval", "longctx", "--model", str(task_model_dir), "--samples", "1", *argv]) == 2
        assert message in capsys.readouterr().err
    assert main(["ask", "--model", str(task_model_dir), "--context", str(tmp_path / "none.txt"),
                 "--question", "x"]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_shared_contexts_are_read_once_and_score_like_reading_anew(task_model_dir):
    """The harness model reads a context shared by several requests once; the scores equal reading each request
    from scratch. Under KV oneshot prefill (where chunk boundaries change what is evicted) nothing is shared."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from msrnn.harness import MsrnnHarnessLM

    ctx = "Mary went to the garden. John moved to the office. " * 6 + "Where is Mary?"
    reqs = [Instance("loglikelihood", {}, (ctx, c), 0) for c in (" garden", " office", " kitchen x")]
    for policy, shares in ((None, True), ("tova", True)):
        h = MsrnnHarnessLM(str(task_model_dir), chunk_size=16, policy=policy, budget=24 if policy else None)
        shared = h.loglikelihood(reqs)
        scratch = [h.loglikelihood([r])[0] for r in reqs]  # one request: nothing to share, read from scratch
        for (a, ga), (b, gb) in zip(shared, scratch, strict=True):
            assert abs(a - b) < 1e-4 and ga == gb
        fed = []
        forward = h.lm.forward_chunk
        h.lm.forward_chunk = lambda ids, st, f=forward, fed=fed: (fed.append(ids.shape[1]), f(ids, st))[1]
        h.loglikelihood(reqs)
        n_ctx = len(h._encode(ctx))
        assert (sum(fed) < 2 * n_ctx) == shares  # the context once, not three times
    h = MsrnnHarnessLM(str(task_model_dir), chunk_size=16, policy="tova", budget=24, prefill="oneshot")
    fed = []
    forward = h.lm.forward_chunk
    h.lm.forward_chunk = lambda ids, st, f=forward: (fed.append(ids.shape[1]), f(ids, st))[1]
    h.loglikelihood(reqs)
    assert sum(fed) >= 3 * len(h._encode(ctx))  # oneshot: every request read anew


def test_lm_eval_task_folders_score_like_lm_evals_own_hf_model(task_model_dir, tmp_path, capsys, monkeypatch):
    """`eval longctx --lm-eval-dir` writes multiple-choice tasks (YAML + local JSONL); lm-eval's `hf` model and msrnn's
    harness model at full budget give the same per-choice log-likelihoods on them."""
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from msrnn.cli.main import main
    from msrnn.harness import MsrnnHarnessLM

    folder = tmp_path / "lmeval"
    assert main(["eval", "longctx", "--model", str(task_model_dir), "--tasks", "passkey,niah_multivalue",
                 "--lengths", "320", "--depths", "0.5", "--samples", "2", "--lm-eval-dir", str(folder),
                 "--json"]) == 0
    names = json.loads(capsys.readouterr().out)["tasks"]
    assert names == ["msrnn_passkey_320", "msrnn_niah_multivalue_320"]
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    manager = TaskManager(include_path=str(folder))
    ref = simple_evaluate(model="hf", model_args=f"pretrained={task_model_dir},dtype=float32", tasks=names,
                          device="cpu", batch_size=1, task_manager=manager)
    ours = simple_evaluate(model=MsrnnHarnessLM(str(task_model_dir), chunk_size=64), tasks=["msrnn_longctx"],
                           task_manager=manager)
    for task in names:
        assert len(ref["samples"][task]) == 2
        for s_ref, s_ours in zip(ref["samples"][task], ours["samples"][task], strict=True):
            for r, o in zip(s_ref["filtered_resps"], s_ours["filtered_resps"], strict=True):
                assert abs(r[0] - o[0]) <= 1e-3 * max(1.0, abs(r[0])), (task, r, o)


def test_compare_runs_the_probes_for_every_entry_at_equal_bytes(task_model_dir, tiny_corpus, tmp_path, capsys):
    from msrnn.cli.main import main

    assert main(["compare", "--base", str(task_model_dir), "--state-bytes", "65536", "--policies", "window,tova",
                 "--data", str(tiny_corpus), "--documents", "file", "--max-tokens", "64", "--max-docs", "1",
                 "--chunk-size", "32", "--profile-tokens", "64", "--longctx", "passkey", "--longctx-lengths", "300",
                 "--longctx-depths", "0,1", "--longctx-samples", "2", "--out", str(tmp_path / "rep"), "--json",
                 "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    entries = {e["name"]: e for e in report["entries"]}
    assert set(entries) == {"full", "kv:window@65536", "kv:tova@65536"}
    for e in entries.values():
        assert [(r["length"], r["depth"]) for r in e["longctx"]] == [(300, 0.0), (300, 1.0)]
    window = {r["depth"]: r["retention"] for r in entries["kv:window@65536"]["longctx"]}
    assert window[1.0] == 1.0 and window[0.0] == 0.0 and entries["full"]["longctx"][0]["retention"] is None
    md = (Path(report["folder"]) / "report.md").read_text()
    assert "## Long-context probes (passkey" in md and "at equal state bytes (rank accuracy / exact match)" in md
    assert main(["compare", "--base", str(task_model_dir), "--state-bytes", "65536", "--longctx", "needle",
                 "--out", str(tmp_path / "rep2")]) == 2


def test_answer_batches_score_only_the_answer_and_follow_the_curriculum(task_tokenizer, haystack):
    from msrnn.train.longctx import LongCtxTuneConfig, answer_batch, answer_loss

    cfg = LongCtxTuneConfig(tasks=["passkey", "niah_single"], lengths=[200, 300, 400], batch_size=3)
    assert [cfg.length_at(s, 9) for s in range(9)] == [200] * 3 + [300] * 3 + [400] * 3
    assert cfg.tokens(9) == 3 * 3 * (200 + 300 + 400)
    gens = [LongCtxGenerator(t, task_tokenizer, haystack) for t in cfg.tasks]
    batch = answer_batch(gens, 200, 3, random.Random(0))
    ids, mask = batch["input_ids"], batch["answer_mask"]
    assert not mask[:, :200].any() and mask[:, 200].all()
    for row, m in zip(ids, mask, strict=True):  # the masked tokens decode to one of the 7-digit answers
        assert task_tokenizer.decode(row[m].tolist()).strip().isdigit()
    model = tiny("llama", seed=2)
    loss = answer_loss(model, batch)
    logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    want = -logp.gather(2, ids[:, 1:, None])[..., 0][mask[:, 1:]].mean()
    assert torch.allclose(loss, want, atol=1e-5)
    with pytest.raises(ConfigError, match="short to long"):
        LongCtxTuneConfig(lengths=[400, 200])
    with pytest.raises(ConfigError, match="unknown long-context task"):
        LongCtxTuneConfig(tasks=["needle"])


@pytest.mark.parametrize("family", ["hf", "supra", "rmt"])
def test_cli_train_longctx_any_family_and_resume(family, task_model_dir, tmp_path, capsys):
    from msrnn.cli.main import main
    from msrnn.models import load_lm

    source = task_model_dir
    if family == "supra":
        source = tmp_path / "supra"
        assert main(["convert", "supra", "--from", str(task_model_dir), "--out", str(source), "--feature-dim", "8",
                     "--quiet"]) == 0
    elif family == "rmt":
        from msrnn.rmt import MemoryWrapper

        source = tmp_path / "rmt"
        MemoryWrapper.wrap(tiny("llama", seed=1), num_memory_tokens=2, segment_length=64).save_pretrained(source)
        load_lm(task_model_dir).tokenizer.save_pretrained(str(source))
        (source / "msrnn.json").write_text(json.dumps({"family": "rmt"}))
    capsys.readouterr()
    argv = ["train", "longctx", "--from", str(source), "--tasks", "passkey", "--lengths", "120,160", "--max-steps",
            "2", "--batch-size", "2", "--save-every", "1", "--out", str(tmp_path / "tuned"), "--json", "--quiet"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["steps"] == 2 and res["prompt_tokens"] == 2 * (120 + 160)
    meta = json.loads((tmp_path / "tuned" / "msrnn.json").read_text())
    assert meta["longctx_tune"]["tasks"] == ["passkey"] and meta["family"] == family
    lm = load_lm(tmp_path / "tuned")
    assert type(lm).__name__ == {"hf": "HFCausalLM", "supra": "SupraLM", "rmt": "RMTLM"}[family]
    assert main(argv[:9] + ["4"] + argv[10:] + ["--resume"]) == 0  # continued to 4 steps
    assert json.loads(capsys.readouterr().out)["steps"] == 4


def test_samples_are_the_same_in_every_process(task_model_dir):
    """Cells are seeded without Python's per-process string hashing: two interpreters with different hash seeds
    draw the same samples."""
    import os
    import subprocess
    import sys

    code = ("import random\nfrom msrnn.evaluate.longctx import cell_seed\nfrom msrnn.models.loading import "
            "load_tokenizer_for\nfrom msrnn.tasks.longctx import LongCtxGenerator\nfrom msrnn.tasks.noise import "
            f"noise_sentences\ntok = load_tokenizer_for({str(task_model_dir)!r})\n"
            "g = LongCtxGenerator('niah_single', tok, noise_sentences('stdlib', 'test', limit=200))\n"
            "print(g.sample(300, 0.5, random.Random(cell_seed(1234, 'niah_single', 300, 0.5))).input_ids[-40:])\n")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONHASHSEED": s}).stdout for s in ("1", "2")}
    assert len(outs) == 1 and outs.pop().startswith("[")


def test_probe_options_without_probes_are_refused(task_model_dir, tmp_path, capsys):
    from msrnn.cli.main import main
    from msrnn.compare import CompareConfig

    with pytest.raises(ConfigError, match="--longctx-samples set the long-context probes"):
        CompareConfig(base="b", longctx_samples=9)
    assert main(["compare", "--base", str(task_model_dir), "--longctx-lengths", "256", "--out", str(tmp_path)]) == 2
    assert "name them with --longctx" in capsys.readouterr().err
    assert main(["eval", "longctx", "--model", str(task_model_dir), "--tasks", "cwe", "--depths", "0.5"]) == 2
    assert "drop --depths" in capsys.readouterr().err
