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
