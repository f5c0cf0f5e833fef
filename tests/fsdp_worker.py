"""Run in a fresh interpreter by test_fsdp.py under 2 gloo processes (or 1 with ``--one``): FSDP2 training of one
family's tiny model, straight through and interrupted at a checkpoint then resumed, and the export.

Usage: fsdp_worker.py OUT TESTS_DIR FAMILY MODE. MODE ``run`` trains 3 steps straight and 2 + resume + 1 split,
and exports; ``reshard`` resumes OUT/split (written by 2 processes) in 1 process with twice the micro-batches.
Each rank writes what it holds to OUT/<mode><rank>.pt.
"""

import sys

import torch

HERE = str(__import__("pathlib").Path(__file__).parent)
OUT, TESTS, FAMILY, MODE, PROCS = "", HERE, "", "", 2  # set from argv when run as a script


def model(family):
    sys.path.insert(0, TESTS)
    from helpers import tiny

    if family == "llama":
        return tiny("llama", seed=0)
    if family == "supra":
        from msrnn.supra import convert

        return convert(tiny("llama", seed=0))
    if family == "bst":
        from msrnn.bst import BSTConfig, BSTForCausalLM

        torch.manual_seed(0)
        return BSTForCausalLM(BSTConfig(vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, block_size=8, state_size=4, ssm_layers=[1]))
    if family == "rmt":
        from msrnn.rmt import MemoryWrapper

        return MemoryWrapper.wrap(tiny("llama", seed=0), num_memory_tokens=2, segment_length=8)
    raise ValueError(family)


def batch(step, micro, rank):
    """Rank r's micro-batch m of a step; under one process with grad_accum 2, micro m plays rank m."""
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    x = torch.randint(0, 384, (2, 24), generator=g)
    return {"input_ids": x, "labels": x}


def config(**kw):
    from msrnn.train import TrainConfig

    base = dict(max_steps=3, lr=1e-2, warmup_steps=1, schedule="constant", grad_clip=1.0, eval_every=0,
                weight_decay=0.1, adam_eps=1e-3, precision="fp32", fsdp=True)
    return TrainConfig(**{**base, **kw})


def full(trainer):
    from msrnn.train.sharding import full_weights

    w = full_weights(trainer.model)
    return {k: v.clone() for k, v in w.items()}


def run():
    from msrnn.train import Trainer

    straight = Trainer(model(FAMILY).train(), config(), batch, f"{OUT}/straight", progress=False)
    straight.train()
    Trainer(model(FAMILY).train(), config(save_every=2), batch, f"{OUT}/split", progress=False).train(until=2)
    resumed = Trainer(model(FAMILY).train(), config(save_every=2), batch, f"{OUT}/split", progress=False)
    assert resumed.resume() and resumed.step == 2
    resumed.train()
    acc = resumed.accelerator
    rows = {"world": acc.num_processes, "straight": full(straight), "resumed": full(resumed),
            "losses": [[h["loss"] for h in t.history] for t in (straight, resumed)],
            "fallback": straight.loss_fn.fallback,  # None: the chunked loss ran on the sharded model
            "local": sum(p.to_local().numel() for p in resumed.model.parameters()),
            "total": sum(p.numel() for p in resumed.model.parameters())}
    straight.export(f"{OUT}/export")
    if acc.is_main_process:
        rows["files"] = sorted(p.name for p in resumed.latest_checkpoint().iterdir())
    torch.save(rows, f"{OUT}/run{acc.process_index}.pt")


def reshard():
    """The 2-process run's last checkpoint (step 3) resumed by 1 process with grad_accum 2 (the same global
    batch) for a fourth step."""
    from msrnn.errors import ConfigError
    from msrnn.train import Trainer

    refused = []
    for kw in ({"grad_accum": 1}, {"grad_accum": 2, "fsdp": False}):  # another global batch; unsharded training
        try:
            Trainer(model(FAMILY).train(), config(max_steps=4, **kw), batch, f"{OUT}/split", progress=False).resume()
        except ConfigError as exc:
            refused.append(str(exc))
    t = Trainer(model(FAMILY).train(), config(max_steps=4, grad_accum=2), batch, f"{OUT}/split", progress=False)
    assert t.resume() and t.step == 3
    loaded = full(t)
    t.train()
    torch.save({"loaded": loaded, "final": full(t), "resharded": t.resharded, "refused": refused},
               f"{OUT}/reshard{t.accelerator.process_index}.pt")


def worker():
    return run() if MODE == "run" else reshard()


if __name__ == "__main__":
    from accelerate.launchers import debug_launcher

    OUT, TESTS, FAMILY, MODE = sys.argv[1:5]
    PROCS = int(sys.argv[5]) if len(sys.argv) > 5 else 2

    debug_launcher(worker, num_processes=PROCS)
