"""The lm-evaluation-harness model scores like a direct forward of the model (skipped without lm-eval)."""

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def model_dir(task_model_dir):
    return task_model_dir


def _req(*args):
    from lm_eval.api.instance import Instance

    return Instance("loglikelihood", {}, args, 0)


def test_loglikelihood_equals_a_direct_forward(model_dir, task_tokenizer):
    from transformers import AutoModelForCausalLM

    from msrnn.harness import MsrnnHarnessLM

    h = MsrnnHarnessLM(str(model_dir), chunk_size=3)
    ctx, cont = "Where is Mary?", " Answer: garden"
    (ll, _), = h.loglikelihood([_req(ctx, cont)])
    a = task_tokenizer(ctx, add_special_tokens=False)["input_ids"]
    b = task_tokenizer(cont, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([a + b])).logits[0].float(), -1)
    ref = sum(float(lp[len(a) - 1 + i, t]) for i, t in enumerate(b))
    assert abs(ll - ref) < 1e-3
    rolling, = h.loglikelihood_rolling([_req("Mary went to the garden.")])
    assert rolling < 0
    text, = h.generate_until([_req("Where is", {"until": ["\n"], "max_gen_toks": 5})])
    assert isinstance(text, str) and "\n" not in text


def test_registered_and_bounded_by_a_policy(model_dir):
    from lm_eval.api.registry import get_model

    import msrnn.harness  # noqa: F401  (importing registers the model name)

    cls = get_model("msrnn")
    h = cls(str(model_dir), policy="tova", budget=8)
    (ll, _), = h.loglikelihood([_req("Mary went to the garden. John moved to the office.", " Where")])
    assert ll < 0 and h.lm.policy.describe() == "tova@8"


def _local_tasks(folder):
    """Three local YAML tasks, one per request type, over a JSONL file: nothing is downloaded."""
    import json

    rows = [{"text": "def add(a, b):\n    return a + b\n", "question": "Mary went to the garden. Where is Mary?",
             "choices": [" garden", " kitchen", " office"], "gold": 0},
            {"text": "import os\nprint(os.getcwd())\n", "question": "John moved to the office. Where is John?",
             "choices": [" bedroom", " office", " garden"], "gold": 1}]
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / "roll.yaml").write_text(
        f"task: msrnn_roll\n{head}output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{{{text}}}}'\n"
        "metric_list:\n  - metric: byte_perplexity\n  - metric: word_perplexity\n")
    (folder / "mc.yaml").write_text(
        f"task: msrnn_mc\n{head}output_type: multiple_choice\ndoc_to_text: '{{{{question}}}} Answer:'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\nmetric_list:\n  - metric: acc\n")
    (folder / "gen.yaml").write_text(
        f"task: msrnn_gen\n{head}output_type: generate_until\ndoc_to_text: '{{{{question}}}} Answer:'\n"
        "doc_to_target: '{{choices[gold]}}'\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return ["msrnn_roll", "msrnn_mc", "msrnn_gen"]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_matches_lm_evals_own_hf_model_on_local_yaml_tasks(model_dir, tmp_path, monkeypatch, batch_size):
    """The same model through `--model msrnn` and through lm-eval's `hf` model, on local loglikelihood_rolling,
    multiple_choice and generate_until tasks: the same perplexities (1e-4), per-choice log-likelihoods and
    generations, scoring one request at a time or four together."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from msrnn.harness import MsrnnHarnessLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = _local_tasks(tmp_path / "tasks")
    ref = simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=tasks, device="cpu",
                          batch_size=1, task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    ours = simple_evaluate(model=MsrnnHarnessLM(str(model_dir), chunk_size=5, batch_size=batch_size), tasks=tasks,
                           task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    for metric in ("byte_perplexity,none", "word_perplexity,none"):
        a, b = ref["results"]["msrnn_roll"][metric], ours["results"]["msrnn_roll"][metric]
        assert abs(a - b) <= 1e-4 * a, (metric, a, b)
    for task in ("msrnn_mc", "msrnn_gen"):
        for s_ref, s_ours in zip(ref["samples"][task], ours["samples"][task], strict=True):
            for r, o in zip(s_ref["filtered_resps"], s_ours["filtered_resps"], strict=True):
                if task == "msrnn_mc":
                    assert abs(r[0] - o[0]) <= 1e-4 * max(1.0, abs(r[0])) and r[1] == o[1]
                else:
                    assert r == o


def test_python_m_msrnn_harness_is_lm_evals_command_line(model_dir, tmp_path):
    """`python -m msrnn.harness run --model msrnn --model_args ...` is lm-eval's own CLI with msrnn registered."""
    import os
    import subprocess
    import sys

    _local_tasks(tmp_path / "tasks")
    r = subprocess.run([sys.executable, "-m", "msrnn.harness", "run", "--model", "msrnn", "--model_args",
                        f"pretrained={model_dir},policy=tova,budget=8,sinks=1", "--tasks", "msrnn_roll",
                        "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "2"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "byte_perplexity" in r.stdout and "'policy': 'tova'" in r.stdout and "batch_size: 2" in r.stdout
    # An msrnn refusal is one line and exit 2, not lm-eval's traceback.
    r = subprocess.run([sys.executable, "-m", "msrnn.harness", "run", "--model", "msrnn", "--model_args",
                        f"pretrained={model_dir},policy=tova,budget=8,positions=cache", "--tasks", "msrnn_roll",
                        "--include_path", str(tmp_path / "tasks"), "--device", "cpu"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("msrnn: error: unknown positions mode")
