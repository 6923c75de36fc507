"""Several "nodes" on this machine: one `torchrun --nnodes N --node_rank R` invocation per node, one process each,
gloo on CPU, rendezvous (c10d) on 127.0.0.1 (test_train_distributed_multinode.py, test_train_doctor.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def started_nodes(argv_of_node: Callable[[int], list[str]], nnodes: int = 2,
                  cwd: Path | Callable[[int], Path] | None = None) -> Iterator[dict[int, subprocess.Popen]]:
    """Start `torchrun ... <argv_of_node(node rank)>` for every node at once (in `cwd`, or `cwd(node rank)`); on
    leaving, kill those still running (with their workers)."""
    port = free_port()
    procs = {}
    try:
        for rank in range(nnodes):
            cmd = [str(TORCHRUN), "--nnodes", str(nnodes), "--nproc_per_node", "1", "--node_rank", str(rank),
                   "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--max_restarts", "0",
                   *argv_of_node(rank)]
            procs[rank] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                           cwd=cwd(rank) if callable(cwd) else cwd, env={**os.environ, **ENV},
                                           start_new_session=True)  # its own process group
        yield procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # torchrun stops its workers (they run in sessions of their own)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def torchrun_nodes(argv_of_node: Callable[[int], list[str]], nnodes: int = 2,
                   cwd: Path | Callable[[int], Path] | None = None,
                   timeout: float = 300) -> dict[int, subprocess.CompletedProcess]:
    """Run `started_nodes` to the end; returns the finished processes by node rank."""
    with started_nodes(argv_of_node, nnodes, cwd) as procs:
        done = {}
        for rank, proc in procs.items():
            out, err = proc.communicate(timeout=timeout)
            done[rank] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done
