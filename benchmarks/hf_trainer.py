"""bench_hf.py's baseline: the Hugging Face Trainer a user runs on a GPT-2 from a config, over token blocks held
in memory. Imports nothing of Shoal. Writes (step, time.time()) at every step's end and the logged losses.

    python benchmarks/hf_trainer.py BLOCKS.npy --steps N --seed S --out OUT.json

The settings are bench_hf.py's (it reads them from here, so both sides train the same model the same way).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

BATCH, SEQ, VOCAB = 12, 64, 2048
LR, WARMUP_LR, WD, BETAS, CLIP, LOG_EVERY = 1e-3, 50, 0.1, (0.9, 0.95), 1.0, 10
GPT2 = {
    "n_layer": 4,
    "n_head": 4,
    "n_embd": 128,
    "n_positions": SEQ,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}


def train(blocks: Path, steps: int, seed: int, out: Path) -> None:
    # imported here, not at the top: bench_hf.py reads the settings above without loading torch
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, Trainer, TrainerCallback, TrainingArguments

    class Blocks(torch.utils.data.Dataset):
        """run_clm.py's blocks: labels = input_ids (the model shifts them)."""

        def __init__(self, ids: np.ndarray):
            self.ids = torch.from_numpy(ids)

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks, self.losses = [], []

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((state.global_step, time.time()))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append((state.global_step, logs["loss"]))

    model = AutoModelForCausalLM.from_config(GPT2Config(**GPT2, vocab_size=VOCAB))
    args = TrainingArguments(
        output_dir=str(out.with_suffix("")),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=LR,
        weight_decay=WD,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        max_grad_norm=CLIP,
        lr_scheduler_type="cosine",
        warmup_steps=WARMUP_LR,
        logging_steps=LOG_EVERY,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=True,
        seed=seed,
    )
    clock = Clock()
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(np.load(blocks)), callbacks=[clock])
    trainer.train()
    info = {"threads": torch.get_num_threads(), "optim": str(args.optim), "params": model.num_parameters()}
    info["loss_scale"] = loss_scale(trainer, torch.from_numpy(np.load(blocks)[:BATCH]))
    out.write_text(json.dumps({"marks": clock.marks, "losses": clock.losses, **info}))


def loss_scale(trainer, ids) -> float:
    """Targets the Trainer divides the summed loss by / targets the model sums over, per batch. Not 1 in
    transformers 5.24: for a model without loss_type (GPT2LMHeadModel's name has no ForCausalLM) the Trainer counts
    the labels unshifted (64 a block) while the model's loss sums 63, so its logged loss is 63/64 of the mean."""
    try:
        counted = float(trainer._get_num_items_in_batch([{"input_ids": ids, "labels": ids}], ids.device))
    except (AttributeError, TypeError):  # a private method: gone in another version, then assume it counts right
        return 1.0
    return counted / (ids.shape[0] * (ids.shape[1] - 1))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("blocks", type=Path, help=".npy of int64 token blocks, [n, SEQ]")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    train(a.blocks, a.steps, a.seed, a.out)
