"""medgpt.train.pt, `streaming: true` under torchrun with two CPU processes: both train, each on its own blocks of
the stream (accelerate's IterableDatasetShard gives process r its share of every global batch); the reference is
the blocks the same stream gives one process."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
from _launch import ENV, TORCHRUN, free_port

SCRIPT = """
import json, os, sys
from trl import SFTTrainer
from medgpt.train import build_config, common, pt

cfg = build_config(json.loads(sys.argv[1]))
trainer, stats = common.build_trainer(cfg, SFTTrainer, pt.text_datasets)
seen = [row.tolist() for _, batch in zip(range(3), trainer.get_train_dataloader()) for row in batch["input_ids"]]
trainer.train()
with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"seen": seen, "steps": trainer.state.global_step}, f)
"""


@pytest.mark.slow
def test_two_processes_train_on_their_own_blocks_of_the_stream(tiny_model, sample_data, tmp_path):
    from trl import SFTTrainer

    from medgpt.train import build_config, common, pt

    options = {"stage": "pt", "model": tiny_model, "data": str(sample_data / "pt" / "medical_corpus.txt"),
               "output_dir": str(tmp_path / "pt"), "streaming": True, "max_steps": 3, "block_size": 32,
               "per_device_train_batch_size": 2, "report_to": "none", "save_strategy": "no", "dtype": "fp32",
               "use_cpu": True}
    (tmp_path / "run.py").write_text(textwrap.dedent(SCRIPT), encoding="utf-8")
    done = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(free_port()),
                           str(tmp_path / "run.py"), json.dumps(options), str(tmp_path)], check=False,
                          capture_output=True, text=True, env={**os.environ, **ENV}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    assert all(r["steps"] == 3 for r in results.values())

    trainer = common.build_trainer(build_config(options), SFTTrainer, pt.text_datasets)[0]
    blocks = [list(row["input_ids"]) for _, row in zip(range(12), trainer.train_dataset)]
    for rank in (0, 1):  # global batches of 4 blocks: process r takes blocks 2r and 2r+1 of each
        assert results[rank]["seen"] == [blocks[i] for start in (0, 4, 8) for i in (start + 2 * rank,
                                                                                     start + 2 * rank + 1)]
