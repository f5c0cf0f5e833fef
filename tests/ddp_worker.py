"""Run in a fresh interpreter by test_ddp.py: one optimizer step of a tiny model under 2-process gloo DDP.

A large Adam eps keeps the first update linear in the gradient, so rounding differences between the
all-reduced and the single-process gradient are not amplified to +-lr on near-zero entries.
Each rank trains on its own batch; DDP averages gradients, so the result must equal one single-process step
on both batches together.
"""

import sys

import torch

OUT = sys.argv[1]


def batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randint(0, 384, (2, 16), generator=g)
    return {"input_ids": x, "labels": x}


def worker():
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
