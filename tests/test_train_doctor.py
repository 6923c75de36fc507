"""`medgpt doctor` on "nodes" of this machine: one `torchrun --nnodes N --node_rank R` invocation per node (gloo,
c10d rendezvous on 127.0.0.1), each node in its own folder holding its own copy of the data, as on separate
machines. The references: what each node was given (which node's data file or config differs, which never ran the
doctor), and nccl-tests' bus-bandwidth formula."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from _launch import ENV, free_port, torchrun_nodes

from medgpt.train.doctor import Launch, find_problems, launch_from_env

DOCTOR = ["-m", "medgpt.cli", "doctor"]


def node_folders(tmp_path: Path, sample_data: Path, nnodes: int, tiny_model: str) -> tuple[Path, list[Path]]:
    """A config with a relative data path, and one folder per node holding `data/train.jsonl` (the same rows)."""
    rows = (sample_data / "sft" / "medical_sft.jsonl").read_text().splitlines()[:20]
    folders = []
    for node in range(nnodes):
        folder = tmp_path / f"node{node}"
        (folder / "data").mkdir(parents=True)
        (folder / "data" / "train.jsonl").write_text("\n".join(rows) + "\n")
        folders.append(folder)
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({
        "stage": "sft", "model": tiny_model, "data": "data/train.jsonl", "max_length": 128,
        "per_device_train_batch_size": 2, "max_steps": 2, "learning_rate": 2e-5, "report_to": "none",
        "report_prompts": "none", "output_dir": str(tmp_path / "out")}))
    return config, folders


def table_rows(text: str) -> dict[int, list[str]]:
    """The doctor's table: rank -> cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("node  rank"))
    rows = {}
    for line in lines[start + 1:]:
        if not re.match(r"\d+\s+\d+\s", line):
            break
        cells = line.split()
        rows[int(cells[1])] = cells
    return rows


@pytest.mark.slow
def test_two_nodes_that_agree_pass_with_a_measured_allreduce(tiny_model, sample_data, tmp_path):
    config, folders = node_folders(tmp_path, sample_data, 2, tiny_model)
    runs = torchrun_nodes(lambda node: [*DOCTOR, str(config)], cwd=lambda node: folders[node], timeout=240)
    assert [runs[n].returncode for n in (0, 1)] == [0, 0], runs[0].stderr[-3000:] + runs[1].stderr[-3000:]
    out = runs[0].stdout
    assert runs[1].stdout == ""  # one table, printed by rank 0
    rows = table_rows(out)
    assert sorted(rows) == [0, 1] and [rows[r][0] for r in (0, 1)] == ["0", "1"]  # node of each rank
    assert rows[0][-5:-1] == rows[1][-5:-1]  # versions, config, data, model digests agree
    assert "doctor: ok, 2 rank(s) on 2 node(s) agree" in out
    # both nodes reach MASTER_ADDR over loopback: a warning in a multi-node run, not a failure
    assert "WARN node 1 rank 1: route to MASTER_ADDR" in out and "interface lo " in out
    # nccl-tests: busbw = algbw x 2(n-1)/n, which is algbw itself for n = 2; algbw = bytes / time
    line = next(line for line in out.splitlines() if line.startswith("all-reduce (gloo, 2 rank(s) on 2 node(s))"))
    for mib, ms, algbw, busbw in re.findall(r"([\d.]+) MiB: ([\d.]+) ms, algbw ([\d.]+) GB/s, busbw ([\d.]+) GB/s",
                                            line):
        assert float(busbw) == float(algbw) > 0
        assert float(algbw) == pytest.approx(float(mib) * 2**20 / (float(ms) / 1e3) / 1e9, rel=0.02, abs=2e-3)
    assert re.search(r"latency \d+ us at 8 B", line)


@pytest.mark.slow
def test_a_node_with_other_data_and_a_node_with_another_config_value_are_named(tiny_model, sample_data, tmp_path):
    config, folders = node_folders(tmp_path, sample_data, 3, tiny_model)
    data = folders[1] / "data" / "train.jsonl"
    data.write_text("".join(data.read_text().splitlines(keepends=True)[1:]))  # one row fewer on node 1
    overrides = {2: ["--learning_rate", "1e-4"]}  # node 2 launched with another learning rate
    runs = torchrun_nodes(lambda node: [*DOCTOR, str(config), *overrides.get(node, [])],
                          nnodes=3, cwd=lambda node: folders[node], timeout=240)
    assert [runs[n].returncode for n in (0, 1, 2)] == [1, 1, 1]
    out = runs[0].stdout
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 2, out
    assert fails[0].startswith("FAIL node 1 rank 1: data file data/train.jsonl: content differs")
    assert fails[1] == "FAIL node 2 rank 2: config learning_rate: 0.0001 here, 2e-05 at rank 0"
    rows = table_rows(out)
    assert [rows[r][-1] for r in (0, 1, 2)] == ["WARN", "FAIL", "FAIL"]  # rank 0: the loopback warning only
    assert rows[1][-3] != rows[0][-3] == rows[2][-3]  # data digests
    assert rows[2][-4] != rows[0][-4] == rows[1][-4]  # config digests
    assert out.splitlines()[-1] == "doctor: FAIL at node 1 rank 1, node 2 rank 2"
    assert "node 2 rank 2: config learning_rate" in runs[2].stderr  # each node's own log says why


@pytest.mark.slow
def test_a_rank_that_never_starts_is_named_within_the_timeout(tiny_model, sample_data, tmp_path):
    config, folders = node_folders(tmp_path, sample_data, 2, tiny_model)
    # a launcher that sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT itself (torchrun, Slurm's srun, Kubernetes)
    # and whose rank 1 never starts: rank 0 hosts the store and names rank 1 within the timeout
    env = {**os.environ, **ENV, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "NODE_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    start = time.monotonic()
    alone = subprocess.run([sys.executable, *DOCTOR, str(config), "--timeout", "3"], capture_output=True, text=True,
                           check=False, env=env, cwd=folders[0], timeout=120)
    took = time.monotonic() - start
    assert alone.returncode == 1
    assert re.search(r"medgpt doctor: FAIL: rank\(s\) 1 \(node 1\) did not join within 3 s; joined: 0 \(node 0, ",
                     alone.stderr), alone.stderr[-2000:]
    assert took < 3 + 40  # the timeout, and the start of python, torch and the config on shared cores


def test_launch_environment_and_problems_without_processes():
    launch = launch_from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                              "GROUP_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert (launch.node, launch.nodes, launch.node_of(7), launch.node_of(3)) == (1, 2, 1, 0)
    assert launch_from_env({}) == Launch()
    from medgpt.errors import UserError

    with pytest.raises(UserError, match="without MASTER_ADDR"):
        launch_from_env({"RANK": "0", "WORLD_SIZE": "2"})
    row = {"rank": 0, "node": 0, "errors": [], "versions": {"torch": "2.13.0"}, "device": "cuda:0 GPU",
           "free_gib": 10.0, "need_gib": 30.0, "interface": "docker0", "config": {"lr": 1}}
    other = {**row, "rank": 1, "node": 1, "versions": {"torch": "2.12.0"}, "need_gib": 5.0, "interface": "eth0"}
    problems = find_problems([row, other], Launch(world_size=2, rank=0))
    assert ("FAIL", 0, 0, "cuda:0 GPU: 10.0 GiB free, the plan needs 30.0 GiB per device") in problems
    assert ("FAIL", 1, 1, "version of torch: '2.12.0' here, '2.13.0' at rank 0") in problems
    assert [p[:3] for p in problems if p[0] == "WARN"] == [("WARN", 0, 0)]  # docker0; eth0 is a real network
    # an interface pinned for the backends counts instead of the route
    pinned = [{**row, "socket_ifname": {"NCCL_SOCKET_IFNAME": "ib0"}},
              {**other, "socket_ifname": {"NCCL_SOCKET_IFNAME": "docker0"}}]
    assert [p[:3] for p in find_problems(pinned, Launch(world_size=2)) if p[0] == "WARN"] == [("WARN", 1, 1)]
