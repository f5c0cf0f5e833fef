"""Run in a fresh interpreter by test_ddp.py, under 2-process gloo DDP: one optimizer step of a tiny model (mode
``step``), or a run interrupted at a checkpoint and resumed against the same run straight through (``resume``).

A large Adam eps keeps the first update linear in the gradient, so rounding differences between the
all-reduced and the single-process gradient are not amplified to +-lr on near-zero entries.
Each rank trains on its own batch; DDP averages gradients, so the result must equal one single-process step
on both batches together.
"""

import sys

import torch

OUT = sys.argv[1]
MODE = sys.argv[3] if len(sys.argv) > 3 else "step"


def batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randint(0, 384, (2, 16), generator=g)
    return {"input_ids": x, "labels": x}


def rng_batch(step, micro, rank):
    """Batches drawn from the global RNG, rank 1 drawing twice: the ranks' RNG states part ways, so only resuming
    every rank's own RNG state continues the same run."""
    for _ in range(rank + 1):
        x = torch.randint(0, 384, (2, 16))
    return {"input_ids": x, "labels": x}


def resume_worker():
    sys.path.insert(0, sys.argv[2])
    from helpers import tiny

    from msrnn.train import TrainConfig, Trainer

    def trainer(out, save_every=0):
        cfg = TrainConfig(max_steps=4, lr=1e-2, warmup_steps=1, grad_clip=1.0, eval_every=0, save_every=save_every)
        return Trainer(tiny("llama", seed=0).train(), cfg, rng_batch, f"{OUT}/{out}", progress=False)

    straight = trainer("straight")
    straight.train()
    trainer("split", save_every=2).train(until=2)  # interrupted after the step-2 checkpoint
    resumed = trainer("split")
    assert resumed.resume() and resumed.step == 2
    resumed.train()
    acc = resumed.accelerator
    rows = {}
    for name, t in (("straight", straight), ("resumed", resumed)):
        rows[name] = {"params": torch.cat([p.detach().flatten() for p in acc.unwrap_model(t.model).parameters()]),
                      "losses": torch.tensor([h["loss"] for h in t.history], dtype=torch.float64)}
    rows["rng"] = torch.get_rng_state()
    rows["files"] = sorted(p.name for p in resumed.latest_checkpoint().iterdir()) if acc.is_main_process else []
    torch.save({"world": acc.num_processes, **rows}, f"{OUT}/resume{acc.process_index}.pt")


def rmt_worker():
    """``train rmt``'s recipe (task loss through the wrapper's forward) for two steps under DDP."""
    sys.path.insert(0, sys.argv[2])
    from helpers import tiny

    from msrnn.data import train_bpe
    from msrnn.families import FAMILIES
    from msrnn.rmt import MemoryWrapper
    from msrnn.tasks.noise import noise_sentences
    from msrnn.tasks.templates import NAMES, PLACES
    from msrnn.train import TrainConfig
    from msrnn.train.curriculum import CurriculumConfig
    from msrnn.train.tasks import TaskTrainConfig, train_task

    words = " ".join(f"{n} went to the {p}. Where is {n}? Answer: {p}" for n in NAMES for p in PLACES)
    tok = train_bpe(iter(noise_sentences("stdlib", "train", limit=300) + [words] * 40), vocab_size=384)
    model = MemoryWrapper.wrap(tiny("llama", seed=0), num_memory_tokens=2, segment_length=64)
    cfg = TrainConfig(max_steps=2, lr=1e-3, warmup_steps=1, eval_every=1, save_every=0, fsdp=MODE == "rmt_fsdp")
    trainer, _ = train_task(model, tok, FAMILIES.get("rmt"), TaskTrainConfig(batch_size=2, val_samples=2),
                            CurriculumConfig(max_segments=2, stage_steps=1), cfg, f"{OUT}/rmt", {}, progress=False)
    acc = trainer.accelerator
    if cfg.fsdp:  # each rank holds a shard: the full weights, gathered
        from msrnn.train.sharding import full_weights

        params = torch.cat([v.flatten() for _, v in sorted(full_weights(trainer.model).items())]) \
            if acc.is_main_process else full_weights(trainer.model)
    else:
        params = torch.cat([p.detach().flatten() for p in acc.unwrap_model(trainer.model).parameters()])
    torch.save({"world": acc.num_processes, "params": params}, f"{OUT}/rmt{acc.process_index}.pt")


def packing_worker():
    """``train supra`` / ``train bst``'s data path (train_lm, documents packed) for two steps under FSDP: every rank
    must choose the same layout (the check runs on the sharded model); BST's ranks may train different row counts."""
    sys.path.insert(0, sys.argv[2])
    from helpers import V, tiny

    from msrnn.bst import BSTConfig, BSTForCausalLM
    from msrnn.data import load_tokenizer
    from msrnn.supra import convert
    from msrnn.train import TrainConfig
    from msrnn.train.pretrain import PretrainConfig, train_lm

    tok = load_tokenizer(f"{OUT}/tok")
    torch.manual_seed(0)
    bst = BSTForCausalLM(BSTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, block_size=8, state_size=4, ssm_layers=[1]))
    result = {}
    for name, model in (("supra", convert(tiny("llama", seed=0))), ("bst", bst)):
        cfg = TrainConfig(max_steps=2, lr=1e-3, warmup_steps=1, eval_every=0, save_every=0, fsdp=True)
        trainer, res = train_lm(model.train(), tok, PretrainConfig(preset=None, data=f"{OUT}/data", seq_len=48,
                                                                   batch_size=3, repeat_fraction=0.0),
                                cfg, f"{OUT}/{name}", {"family": name}, progress=False)
        result[name] = {"layout": trainer.batch_fn.layout, "loss": res.final_loss}
    torch.save(result, f"{OUT}/packing{trainer.accelerator.process_index}.pt")


def worker():
    if MODE == "resume":
        return resume_worker()
    if MODE == "packing":
        return packing_worker()
    if MODE in ("rmt", "rmt_fsdp"):
        return rmt_worker()
    sys.path.insert(0, sys.argv[2])
    from helpers import tiny

    from msrnn.train import TrainConfig, Trainer

    model = tiny("llama", seed=0).train()
    cfg = TrainConfig(max_steps=1, lr=1e-2, warmup_steps=0, schedule="constant", grad_clip=0.0, eval_every=0,
                      weight_decay=0.0, adam_eps=1e-3)
    t = Trainer(model, cfg, lambda step, micro, rank: batch(rank), OUT + "/run", progress=False)
    t.train()
    acc = t.accelerator
    params = torch.cat([p.detach().flatten() for p in acc.unwrap_model(t.model).parameters()])
    torch.save({"world": acc.num_processes, "params": params}, f"{OUT}/rank{acc.process_index}.pt")


if __name__ == "__main__":
    from accelerate.launchers import debug_launcher

    debug_launcher(worker, num_processes=2)
