"""Run under torchrun: record which dataset indices each rank's DataLoader yields, per epoch (tests)."""

import json
import sys
from pathlib import Path

import torch

from trainer.config import TrainingConfig
from trainer.data import build_dataloader
from trainer.run_dir import RunDir
from trainer.setup import build_accelerator


class Indices(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        return i


out, batch = Path(sys.argv[1]), int(sys.argv[2])
config = TrainingConfig(train_batch_size=batch, dataloader_num_workers=0, seed=3, output_dir=out)
accelerator = build_accelerator(config, RunDir.of(config))
loader = accelerator.prepare(build_dataloader(config, Indices(), 1))
epochs = []
for epoch in range(2):
    loader.set_epoch(epoch)
    epochs.append([b.tolist() for b in loader])
(out / f"rank{accelerator.process_index}-of-{accelerator.num_processes}.json").write_text(json.dumps(epochs))
