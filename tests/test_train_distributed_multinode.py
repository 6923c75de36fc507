"""SFT on two "nodes": two `torchrun --nnodes 2 --node_rank R` invocations with one process each (gloo on CPU,
c10d rendezvous on 127.0.0.1), as users launch on two machines. The references: the tokens the run itself logs
per step (TRL's `num_tokens`, gathered over all ranks), the data set's own rows, and an uninterrupted run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from _launch import torchrun_nodes

STEPS, BATCH = 4, 2

# Under the same launch, each rank writes the batches the trainer's own dataloader gives it (its `set_seed`
# first, as Trainer.train does): the rows (unpadded token ids) every rank trains on.
PROBE = """
import json, os, sys
from transformers import set_seed
from trl import SFTTrainer
from medgpt.train import load_config
from medgpt.train.common import build_trainer
from medgpt.train.sft import build_datasets

cfg = load_config(sys.argv[1])
trainer, _ = build_trainer(cfg, SFTTrainer, build_datasets)
set_seed(cfg.train.seed)
batches = [[ids[mask.bool()].tolist() for ids, mask in zip(b["input_ids"], b["attention_mask"])]
           for b in trainer.get_train_dataloader()]
with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"node": int(os.environ["GROUP_RANK"]), "world": int(os.environ["WORLD_SIZE"]),
               "batches": batches, "dataset": [list(r) for r in trainer.train_dataset["input_ids"]]}, f)
"""


def write_config(path: Path, model: str, data: Path, out: Path, **extra) -> Path:
    path.write_text(yaml.safe_dump({
        "stage": "sft", "model": model, "data": str(data), "max_length": 128, "per_device_train_batch_size": BATCH,
        "max_steps": STEPS, "logging_steps": 1, "save_strategy": "steps", "save_steps": 2, "seed": 0,
        "report_to": "none", "report_prompts": "none", "output_dir": str(out), **extra,
    }))
    return path


def train_on_two_nodes(config: Path, cwd: Path) -> None:
    runs = torchrun_nodes(lambda rank: ["-m", "medgpt.cli", "train", str(config)], cwd=cwd)
    for rank, run in runs.items():
        assert run.returncode == 0, f"node {rank}: {run.stderr[-3000:]}"


def losses(out: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in row}


@pytest.mark.slow
def test_sft_on_two_nodes_splits_the_data_saves_once_and_resumes_exactly(tiny_model, sample_data, tmp_path):
    from safetensors.torch import load_file

    data = sample_data / "sft" / "medical_sft.jsonl"
    out = tmp_path / "run"
    train_on_two_nodes(write_config(tmp_path / "sft.yaml", tiny_model, data, out), tmp_path)

    # epoch accounting of world size 2: an epoch is ceil(kept / (2 ranks x batch)) steps
    kept = json.loads((out / "data_stats.json").read_text())["train"]["kept"]
    assert json.loads((out / "final_metrics.json").read_text())["epoch"] == pytest.approx(
        STEPS / math.ceil(kept / (2 * BATCH)), rel=1e-3)
    # checkpoints and the final adapter written once (by rank 0), each rank's RNG state beside them
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("adapter_model.safetensors")) == [
        "adapter_model.safetensors", "checkpoint-2/adapter_model.safetensors", "checkpoint-4/adapter_model.safetensors"]
    assert sorted(p.name for p in (out / "checkpoint-2").glob("rng_state_*.pth")) == ["rng_state_0.pth",
                                                                                       "rng_state_1.pth"]
    assert json.loads((out / "medgpt.json").read_text())["complete"] is True
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(row["step"] for row in logged if "loss" in row) == list(range(1, STEPS + 1))

    # disjoint data: the two ranks' batches over one epoch split the data set's rows between them, and the
    # tokens of both ranks' batch k are the tokens the training run logged for step k
    probe = tmp_path / "probe"
    probe.mkdir()
    (tmp_path / "probe.py").write_text(PROBE)
    config = write_config(tmp_path / "probe.yaml", tiny_model, data, tmp_path / "probe-out")
    for rank, run in torchrun_nodes(lambda rank: ["probe.py", str(config), str(probe)], cwd=tmp_path).items():
        assert run.returncode == 0, f"node {rank}: {run.stderr[-3000:]}"
    seen = [json.loads((probe / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(s["node"], s["world"]) for s in seen] == [(0, 2), (1, 2)]
    rows = [[tuple(row) for batch in s["batches"] for row in batch] for s in seen]
    assert len(rows[0]) == len(rows[1]) == kept // 2
    assert not set(rows[0]) & set(rows[1])
    assert sorted(rows[0] + rows[1]) == sorted(tuple(r) for r in seen[0]["dataset"])
    tokens = [sum(len(row) for s in seen for row in s["batches"][k]) for k in range(STEPS)]
    counted = [row["num_tokens"] for row in logged if "num_tokens" in row]
    assert tokens == [b - a for a, b in zip([0, *counted], counted)]

    # --resume from checkpoint-2 trains steps 3 and 4 exactly as the uninterrupted run did
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    train_on_two_nodes(write_config(tmp_path / "resume.yaml", tiny_model, data, resumed, resume=True), tmp_path)
    assert losses(resumed) == {3: losses(out)[3], 4: losses(out)[4]}
    final, again = load_file(out / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert final.keys() == again.keys()
    assert all(final[k].equal(again[k]) for k in final)
