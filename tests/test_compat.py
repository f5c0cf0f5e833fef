"""The transformers contracts msrnn relies on (msrnn.compat), the tested version range, and the run-time guard
that turns a broken contract into an error instead of a silently stateless model."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import V, tiny

from msrnn import compat
from msrnn.compat import CompatError, cache_kwargs, check_contracts, output_cache, take_cache
from msrnn.errors import MsrnnError

ROOT = Path(__file__).resolve().parents[1]


def test_every_contract_holds_on_this_transformers():
    check_contracts()  # names every failing contract at once


def test_a_broken_contract_is_named(monkeypatch):
    def broken() -> None:
        raise AssertionError("gone")

    monkeypatch.setitem(compat.CONTRACTS, "a contract", broken)
    with pytest.raises(CompatError, match="a contract: AssertionError: gone"):
        check_contracts()


def test_pyproject_declares_the_range_compat_enforces():
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("transformers"))
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(spec.removeprefix("transformers")) == SpecifierSet(compat.TRANSFORMERS_RANGE)
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"transformers=={compat.TRANSFORMERS_MIN}" in ci  # CI runs the lowest version too


def test_older_transformers_is_refused_newer_is_checked_and_warned_once(monkeypatch):
    compat.check_transformers_version(compat.TRANSFORMERS_MIN)
    compat.check_transformers_version(compat.TRANSFORMERS_TESTED)
    with pytest.raises(CompatError, match="older than msrnn supports"):
        compat.check_transformers_version("5.3.0")
    monkeypatch.setattr(compat, "_NEWER_CHECKED", {})
    with pytest.warns(UserWarning, match="newer than the newest release msrnn is tested on") as record:
        compat.check_transformers_version("9.0.0")
        compat.check_transformers_version("9.0.0")
        compat.check_transformers_version("9.0.0")
    assert len([w for w in record if "newer than" in str(w.message)]) == 1  # once per process, not per call


def test_newer_transformers_whose_contract_fails_is_refused(monkeypatch):
    def broken() -> None:
        raise AssertionError("gone")

    monkeypatch.setattr(compat, "_NEWER_CHECKED", {})
    monkeypatch.setitem(compat.CONTRACTS, "a contract", broken)
    with pytest.raises(CompatError, match="a contract: AssertionError: gone"):
        compat.check_transformers_version("9.0.0")
    compat.check_transformers_version(compat.TRANSFORMERS_TESTED)  # the tested range is not re-checked


def test_cli_refuses_older_transformers_in_one_line(monkeypatch, capsys):
    from msrnn.cli.main import main

    monkeypatch.setattr(compat, "transformers", types.SimpleNamespace(__version__="5.3.0"))
    assert main(["eval", "ppl", "--model", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("msrnn: error: transformers 5.3.0 is older") and "\n" not in err


def test_cache_names_round_trip():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    out = compat.model_output(CausalLMOutputWithPast, logits=torch.zeros(1), cache="c")
    assert output_cache(out) == "c"
    kw = {"past_key_values": "a", "x": 1}
    assert take_cache(kw) == "a" and kw == {"x": 1}
    kw = {"cache": None, "past_key_values": "a"}
    assert take_cache(kw) == "a" and kw == {}
    with pytest.raises(MsrnnError, match="not both"):
        take_cache({"cache": "a", "past_key_values": "b"})
    assert cache_kwargs("c", tiny("llama")) == {compat.CACHE_KWARG: "c"}


def _supra():
    from msrnn.supra import SupraLM, convert

    return SupraLM(convert(tiny("llama", seed=2)))


def _kv():
    from msrnn.kv import KVEvictionLM, make_policy

    return KVEvictionLM(tiny("llama", seed=2), make_policy("tova", 8))


def _full():
    from msrnn.models import HFCausalLM

    return HFCausalLM(tiny("llama", seed=2))


def _rmt():
    from msrnn.rmt import MemoryWrapper
    from msrnn.rmt.lm import RMTLM

    return RMTLM(MemoryWrapper.wrap(tiny("llama", seed=2), num_memory_tokens=2, segment_length=8, bptt_depth=-1))


@pytest.mark.parametrize("make", [_supra, _kv, _full, _rmt], ids=["supra", "kv", "full", "rmt"])
def test_a_model_that_ignores_its_cache_raises(make, monkeypatch):
    """Simulate the 5.24 failure: the cache goes in under a keyword the model does not read (so it lands in
    **kwargs and is dropped). The stream must stop with an error naming the cause, not carry on stateless."""
    lm = make()
    monkeypatch.setattr(compat, "cache_kwarg_for", lambda model: "no_such_cache_keyword")
    state = lm.init_state(1)
    with pytest.raises(CompatError, match="did not advance.*transformers"), torch.no_grad():
        for _ in range(3):
            _, state = lm.forward_chunk(torch.randint(0, V, (1, 5)), state)


def test_supra_streaming_perplexity_is_chunk_invariant_with_constant_state():
    """The issue's acceptance check: chunk 1 equals chunk 37 and the state stays the same size."""
    from msrnn.evaluate import StreamEvalConfig, evaluate_stream

    lm = _supra()
    docs = [torch.randint(0, V, (150,)).numpy(), torch.randint(0, V, (91,)).numpy()]
    with torch.no_grad():
        one = evaluate_stream(lm, docs, StreamEvalConfig(chunk_size=1))
        big = evaluate_stream(lm, docs, StreamEvalConfig(chunk_size=37))
    assert abs(one.ppl - big.ppl) < 1e-3 * one.ppl
    sizes = set()
    state = lm.init_state(1)
    with torch.no_grad():
        for n in (1, 37, 100):
            _, state = lm.forward_chunk(torch.randint(0, V, (1, n)), state)
            sizes.add(lm.state_nbytes(state))
    assert len(sizes) == 1 and sizes.pop() > 0


def test_generate_threads_a_given_cache_through_every_step():
    """generate() must use the cache it is handed (and hand it back), under this release's keyword."""
    from msrnn.kv import make_cache, make_policy, prepare_model

    model = prepare_model(tiny("llama", seed=3))
    cache = make_cache(model, make_policy("tova", 6))
    x = torch.randint(1, V, (1, 9))
    model.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0, **cache_kwargs(cache))
    assert cache.get_seq_length() == 9 + 5 - 1  # the last token is sampled, not fed
    assert cache.max_slots() == 6


def test_import_is_quiet_about_deprecated_cache_keywords(tmp_path):
    """No FutureWarning about `past_key_values` from msrnn's own calls (every command used to print one)."""
    import subprocess

    code = ("import warnings, torch; warnings.simplefilter('error', FutureWarning);"
            f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from helpers import tiny;"
            "from msrnn.supra import SupraLM, convert; from msrnn.kv import KVEvictionLM, make_policy;"
            "from msrnn.protocol import stream_logits;"
            "x = torch.randint(0, 300, (1, 12));"
            "stream_logits(SupraLM(convert(tiny('llama'))), x, 5);"
            "stream_logits(KVEvictionLM(tiny('llama'), make_policy('tova', 4)), x, 5); print('ok')"
            )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_constraints_file_pins_a_tested_transformers():
    """constraints.txt holds the exact versions behind the README's figures; they must be inside the range."""
    from packaging.version import Version

    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    v = Version(pins["transformers"])
    assert Version(compat.TRANSFORMERS_MIN) <= v < Version(compat.TRANSFORMERS_BELOW)
    assert "torch" in pins and "tokenizers" in pins
    assert "constraints.txt" in (ROOT / "README.md").read_text()


def test_a_transformers_that_cannot_import_its_models_is_one_line(monkeypatch, capsys):
    """transformers 5.4 beside the `kernels` package 5.25 pulls in fails inside its own import; msrnn says so in one
    line instead of a traceback at `import msrnn`."""
    from msrnn.cli.main import main

    monkeypatch.setattr(compat, "_IMPORT_ERROR", ValueError("Either a revision or a version must be specified."))
    with pytest.raises(CompatError, match="cannot import its own Llama model"):
        compat.check_transformers_version()
    assert main(["doctor"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("msrnn: error: transformers") and "fresh environment" in err and "\n" not in err
