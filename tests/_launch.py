"""Several "nodes" on this machine: one `torchrun --nnodes N --node_rank R` invocation per node, one process each,
gloo on CPU, rendezvous (c10d) on 127.0.0.1 (test_train_distributed_multinode.py, test_train_doctor.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_nodes(argv_of_node, nnodes: int = 2, cwd: Path | None = None, timeout: float = 300,
                   nodes: list[int] | None = None, env: dict | None = None) -> dict[int, subprocess.CompletedProcess]:
    """Start `torchrun ... <argv_of_node(rank)>` for each node rank in `nodes` (default: all of them) at once and
    wait for all; returns the finished processes by node rank (a node left out never starts)."""
    port = free_port()
    procs = {}
    for rank in range(nnodes) if nodes is None else nodes:
        cmd = [str(TORCHRUN), "--nnodes", str(nnodes), "--nproc_per_node", "1", "--node_rank", str(rank),
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--max_restarts", "0",
               *argv_of_node(rank)]
        procs[rank] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                                       env={**os.environ, **ENV, **(env or {})})
    done = {}
    for rank, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs.values():
                other.kill()
            raise
        done[rank] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done
