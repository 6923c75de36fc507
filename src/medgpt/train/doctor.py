"""`medgpt doctor`: a check of a (multi-node) launch before training, run under the same launcher and config.

Every expected rank must join within a timeout (one that does not is named, with its node); then every rank's
versions, config, data files and model files are compared with rank 0's; the all-reduce latency and bus bandwidth
are measured on the backend training uses (gloo on CPUs, NCCL on GPUs); and each rank reports the network interface
that routes to MASTER_ADDR, its device and free memory against the memory planner's estimate for the config, and
the free disk under output_dir. The launch contract is torchrun's (and accelerate's, which runs on it): RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK (or NODE_RANK), MASTER_ADDR, MASTER_PORT.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

from medgpt.errors import UserError
from medgpt.files import file_digest, value_digest

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "deepspeed", "medgpt")
# loopback, container bridges and virtual pairs, VPN tunnels: wrong (or slow) for traffic between nodes
VIRTUAL_INTERFACES = ("lo", "docker", "veth", "br-", "virbr", "cni", "flannel", "tun", "tap", "wg", "tailscale",
                      "zt", "utun")
SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address
GIB = 2**30
COLLECTIVE_TIMEOUT = 1800  # seconds, once every rank has joined (reading a large model's files takes minutes)


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the launch, from the launcher's environment."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    agent_store: bool = False  # torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE)
    attempt: str = "0"  # torchrun's restart count: each attempt joins afresh

    @property
    def nodes(self) -> int:
        return max(1, -(-self.world_size // self.local_world_size))

    def node_of(self, rank: int) -> int:
        """The node a rank is on, as torchrun assigns ranks (node by node, LOCAL_WORLD_SIZE each)."""
        return rank // self.local_world_size


def launch_from_env(env=os.environ) -> Launch:
    """The launch this process is part of (one process alone when no launcher set WORLD_SIZE)."""
    try:
        world = int(env.get("WORLD_SIZE", 1))
        rank = int(env.get("RANK", 0))
        nnodes = int(env.get("NNODES") or 0)
        local_world = int(env.get("LOCAL_WORLD_SIZE") or (world // nnodes if nnodes else 1))
        node = env.get("GROUP_RANK") or env.get("NODE_RANK")
        launch = Launch(rank=rank, world_size=world, local_rank=int(env.get("LOCAL_RANK", 0)),
                        local_world_size=max(1, local_world), node=int(node) if node else rank // max(1, local_world),
                        master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env.get("MASTER_PORT", 29500)),
                        agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
                        attempt=env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError as exc:
        raise UserError(f"launcher environment: {exc}") from None
    if world > 1 and not ("MASTER_ADDR" in env and "MASTER_PORT" in env):
        raise UserError(f"WORLD_SIZE {world} without MASTER_ADDR and MASTER_PORT: run under torchrun or "
                        "accelerate launch, or set them")
    if not 0 <= rank < world:
        raise UserError(f"RANK {rank} outside WORLD_SIZE {world}")
    return launch


class NotJoined(Exception):
    """Not every rank joined within the timeout; the message names the missing ranks and their nodes."""


def _key(launch: Launch, name: str) -> str:
    return f"medgpt-doctor/{launch.attempt}/{name}"


def join(launch: Launch, timeout: float):
    """Connect to the launch's store and wait for every rank to register (its host and node); returns the store.
    Raises NotJoined naming the ranks that did not arrive within `timeout` seconds."""
    from torch.distributed import TCPStore

    host = socket.gethostname()
    hosting = launch.rank == 0 and not launch.agent_store
    try:
        store = TCPStore(launch.master_addr, launch.master_port, launch.world_size if hosting else None,
                         is_master=hosting, timeout=timedelta(seconds=timeout), wait_for_workers=False,
                         multi_tenant=True)
    except Exception as exc:  # torch.distributed.DistStoreError, or an address that does not resolve
        raise NotJoined(f"rank {launch.rank} (node {launch.node}, {host}) could not reach the store at "
                        f"{launch.master_addr}:{launch.master_port} within {timeout:g} s: rank 0 (node 0) did not "
                        f"start, or that address is not reachable from this node ({str(exc).splitlines()[0]})")
    store.set(_key(launch, f"joined/{launch.rank}"), json.dumps({"host": host, "node": launch.node}))
    keys = [_key(launch, f"joined/{r}") for r in range(launch.world_size)]
    deadline = time.monotonic() + timeout
    while not store.check(keys):
        if time.monotonic() > deadline:
            here = [r for r, k in enumerate(keys) if store.check([k])]
            missing = [r for r in range(launch.world_size) if r not in here]
            seen = ", ".join(f"{r} (node {info['node']}, {info['host']})"
                             for r in here for info in [json.loads(store.get(keys[r]))])
            raise NotJoined(f"rank(s) {', '.join(f'{r} (node {launch.node_of(r)})' for r in missing)} did not join "
                            f"within {timeout:g} s; joined: {seen}")
        time.sleep(0.1)
    return store


# ---- what each rank reports ----------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def data_files(cfg) -> list[str]:
    """The files (and hub names) the config's data and eval data are read from."""
    from medgpt.data.rows import DataStats, expand

    return [str(item) for source in (cfg.data.data, cfg.data.eval_data) if source
            for item in expand(source, "pt", DataStats())]


def content_digests(items: list[str]) -> dict[str, str]:
    """SHA-256 of each file's bytes by its name as configured (a hub data set name stands for itself)."""
    return {item: file_digest(item) if Path(item).expanduser().is_file() else f"hub:{item}" for item in items}


def model_files(cfg) -> list[str]:
    """The files of the model folder (and of the adapter folder) the config trains."""
    from medgpt.models import resolve_model

    folders = [resolve_model(cfg.model.model, cfg.model.trust_remote_code)]
    if cfg.model.adapter:
        folders.append(resolve_model(cfg.model.adapter))
    return [str(p) for folder in folders for p in sorted(Path(folder).iterdir()) if p.is_file()]


def route_interface(addr: str) -> tuple[str | None, str | None]:
    """(interface name, local address) of the route this node takes to `addr` (IPv4)."""
    import fcntl
    import struct

    try:
        target = socket.gethostbyname(addr)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))  # UDP: picks the route, sends nothing
            local = s.getsockname()[0]
    except OSError:
        return None, None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == local:
                return name, local
    return None, local


def is_virtual(interface: str | None) -> bool:
    return bool(interface) and interface.startswith(VIRTUAL_INTERFACES)


def device_memory(launch: Launch) -> dict[str, Any]:
    """This rank's device: a GPU's name with its free and total memory, or the CPU with the RAM available to it
    (shared by the node's ranks: its share)."""
    import torch

    if torch.cuda.is_available():
        index = launch.local_rank % torch.cuda.device_count()
        free, total = torch.cuda.mem_get_info(index)
        return {"device": f"cuda:{index} {torch.cuda.get_device_name(index)}", "free_gib": free / GIB,
                "total_gib": total / GIB}
    available = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemAvailable:")), 0) if Path("/proc/meminfo").exists() else 0
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    share = launch.local_world_size
    return {"device": f"cpu ({os.cpu_count()} cores" + (f", 1/{share} of RAM)" if share > 1 else ")"),
            "free_gib": available / share / GIB, "total_gib": total / share / GIB}


def planned_peak_gib(cfg, launch: Launch, gpu: bool) -> float:
    """The planner's peak memory per device for the config (`medgpt plan`'s estimate)."""
    from dataclasses import replace

    from medgpt.config import plan_args
    from medgpt.plan import architectures, estimate

    args = plan_args(cfg, gpu, bool(getattr(cfg.train, "activation_checkpointing", False)))
    if gpu:
        args = replace(args, gpus=launch.world_size, zero=int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0")))
    args.validate()
    return estimate(args, *architectures(args))[0].peak / GIB


def existing_parent(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _attempt(errors: list[str], what: str, fn, *args, default=None):
    try:
        return fn(*args)
    except Exception as exc:  # reported in the table instead of stopping the other ranks at a collective
        errors.append(f"{what}: {exc}")
        return default


def rank_facts(config: str | None, overrides: list[str], launch: Launch) -> dict[str, Any]:
    """What this rank reports. Errors (a config that does not build, a missing file) are reported, not raised,
    so every rank still reaches the comparison. Files are read by each node's local rank 0 only."""
    import torch

    from medgpt.train import load_config

    errors: list[str] = []
    interface, address = route_interface(launch.master_addr)
    facts: dict[str, Any] = {
        "rank": launch.rank, "node": launch.node, "local_rank": launch.local_rank, "host": socket.gethostname(),
        "versions": versions(), "interface": interface, "address": address, "errors": errors,
        "socket_ifname": {k: os.environ[k] for k in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME") if k in os.environ},
        **device_memory(launch),
    }
    cfg = _attempt(errors, "config", load_config, config, overrides)
    if cfg is None:
        return facts
    facts["config"] = settled_config(cfg)
    facts["need_gib"] = _attempt([], "plan", planned_peak_gib, cfg, launch, torch.cuda.is_available())
    if launch.local_rank == 0:
        facts["data"] = _attempt(errors, "data", lambda: content_digests(data_files(cfg)))
        files = _attempt(errors, "model", model_files, cfg, default=[])
        facts["model"] = _attempt(errors, "model", content_digests, files)
        facts["model_gib"] = sum(Path(f).stat().st_size for f in files) / GIB
    out = cfg.output_dir
    facts["output_dir"] = str(out)
    facts["disk_free_gib"] = shutil.disk_usage(existing_parent(out)).free / GIB
    return facts


PER_PROCESS_KEYS = {"local_rank"}  # TrainingArguments' own copy of the launcher's LOCAL_RANK


def settled_config(cfg) -> dict[str, Any]:
    """Every option of the run as the stage will use it (values parsed, defaults and device choices settled), one
    flat dict: two ranks that train alike agree on it, however their YAML or command line spelled it."""
    from dataclasses import asdict, is_dataclass

    parts = [cfg.train.to_dict(), *(asdict(part) for part in (cfg.run, cfg.model, cfg.data, cfg.lora, cfg.stage_args)
                                    if is_dataclass(part))]
    return {k: json.loads(json.dumps(v, default=str)) for part in parts for k, v in part.items()
            if k not in PER_PROCESS_KEYS}


# ---- collectives -----------------------------------------------------------------------------------


def measure_allreduce(sizes: list[int], device, iters: int = 10, warmup: int = 3) -> list[dict[str, float]]:
    """All-reduce (sum) of float32 tensors of each size in bytes, timed as nccl-tests does: the mean time per
    call (the slowest rank's), algbw = bytes / time, busbw = algbw x 2(n-1)/n."""
    import torch
    import torch.distributed as dist

    n = dist.get_world_size()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = []
    for size in sizes:
        x = torch.zeros(max(1, size // 4), dtype=torch.float32, device=device)
        for _ in range(warmup):
            dist.all_reduce(x)
        sync()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        sync()
        elapsed = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        seconds, nbytes = float(elapsed), x.numel() * 4
        results.append({"bytes": nbytes, "seconds": seconds, "algbw_gbps": nbytes / seconds / 1e9,
                        "busbw_gbps": nbytes / seconds / 1e9 * 2 * (n - 1) / n})
    return results


def output_dir_shared(output_dir: str | None, launch: Launch) -> bool | None:
    """Whether this rank sees the file rank 0 writes in output_dir (checkpoints written by rank 0 are what a
    resumed run on every node reads). A collective: every rank calls it."""
    import torch.distributed as dist

    token = [secrets.token_hex(8) if launch.rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    marker = Path(output_dir or ".") / f".medgpt-doctor-{token[0]}"
    created = False
    if launch.rank == 0 and output_dir:
        created = not marker.parent.exists()
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("")
    dist.barrier()
    seen = bool(output_dir) and marker.exists()
    dist.barrier()
    if launch.rank == 0 and output_dir:
        marker.unlink()
        if created and not any(marker.parent.iterdir()):
            marker.parent.rmdir()
    return seen if output_dir else None


# ---- the verdict -----------------------------------------------------------------------------------


@dataclass
class Report:
    launch: Launch
    backend: str = ""
    rows: list[dict] = field(default_factory=list)
    allreduce: list[dict] = field(default_factory=list)
    problems: list[tuple[str, int | None, int | None, str]] = field(default_factory=list)  # level, node, rank, text

    @property
    def failed(self) -> bool:
        return any(level == "FAIL" for level, *_ in self.problems)

    def table(self) -> str:
        return format_report(self)


def _differences(mine: dict | None, ref: dict | None, what: str) -> list[str]:
    """Keys whose values differ between two {name: value} dicts, named for a reader."""
    if mine is None or ref is None:
        return []
    out = []
    for key in sorted(set(mine) | set(ref), key=str):
        if key not in ref:
            out.append(f"{what} {key}: {mine[key]} here, absent at rank 0")
        elif key not in mine:
            out.append(f"{what} {key}: absent here, {ref[key]} at rank 0")
        elif mine[key] != ref[key]:
            if what in ("data file", "model file"):
                out.append(f"{what} {key}: content differs (sha256 {str(mine[key])[:12]} here, "
                           f"{str(ref[key])[:12]} at rank 0)")
            else:
                out.append(f"{what} {key}: {mine[key]!r} here, {ref[key]!r} at rank 0")
    return out


def find_problems(rows: list[dict], launch: Launch) -> list[tuple[str, int, int, str]]:
    """Everything wrong (FAIL) or doubtful (WARN) about each rank, compared with rank 0."""
    ref = rows[0]
    problems = []
    for row in rows:
        def add(level: str, text: str, row=row) -> None:
            problems.append((level, row["node"], row["rank"], text))

        for error in row["errors"]:
            add("FAIL", error)
        for text in _differences(row["versions"], ref["versions"], "version of"):
            add("FAIL", text)
        for text in _differences(row.get("config"), ref.get("config"), "config"):
            add("FAIL", text)
        for kind in ("data", "model"):
            ref_files = ref if ref.get(kind) is not None else {}
            for text in _differences(row.get(kind), ref_files.get(kind), f"{kind} file"):
                add("FAIL", text)
        need, free = row.get("need_gib"), row["free_gib"]
        if need is not None and need > free:
            add("FAIL", f"{row['device']}: {free:.1f} GiB free, the plan needs {need:.1f} GiB per device")
        pinned = row.get("socket_ifname") or {}
        if launch.nodes > 1 and pinned:  # the backends use the interface named, whatever the route
            for name, value in pinned.items():
                if is_virtual(value.lstrip("=").split(",")[0]):
                    add("WARN", f"{name}={value}: a loopback, container or VPN interface in a multi-node run")
        elif launch.nodes > 1 and (row["interface"] is None or is_virtual(row["interface"])):
            add("WARN", f"route to MASTER_ADDR {launch.master_addr} leaves by interface {row['interface'] or '?'} "
                        "(loopback, container or VPN) in a multi-node run: set NCCL_SOCKET_IFNAME and "
                        "GLOO_SOCKET_IFNAME to the nodes' fast network")
        if row.get("model_gib") and row.get("disk_free_gib") is not None and row["disk_free_gib"] < row["model_gib"]:
            add("WARN", f"{row['disk_free_gib']:.1f} GiB free under {row['output_dir']}, less than the model's "
                        f"{row['model_gib']:.1f} GiB")
        if row.get("output_dir_shared") is False:
            add("WARN", f"output_dir {row['output_dir']} is not the folder rank 0 writes to (not shared): checkpoints "
                        "are saved by rank 0 only, so --resume needs output_dir on storage every node mounts")
    return problems


def _short(value: Any) -> str:
    return value_digest(value)[:8] if value is not None else "-"


def format_report(report: Report) -> str:
    rows = report.rows
    head = ("node", "rank", "host", "interface", "device", "free GiB", "need GiB", "disk GiB", "versions", "config",
            "data", "model", "status")
    status = {}
    for level, _, rank, _ in report.problems:
        status[rank] = "FAIL" if level == "FAIL" or status.get(rank) == "FAIL" else "WARN"
    body = [(str(r["node"]), str(r["rank"]), r["host"],
             " ".join([r["interface"] or "?", r["address"] or "",
                       *(f"{k}={v}" for k, v in (r.get("socket_ifname") or {}).items())]).strip(),
             r["device"], f"{r['free_gib']:.1f}", "-" if r.get("need_gib") is None else f"{r['need_gib']:.2f}",
             "-" if r.get("disk_free_gib") is None else f"{r['disk_free_gib']:.1f}", _short(r["versions"]),
             _short(r.get("config")), _short(r.get("data")), _short(r.get("model")), status.get(r["rank"], "ok"))
            for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [head, *body]]
    lines.append("(versions, config, data, model: the first hex digits of a digest; equal digits, equal contents)")
    lines.append("versions at rank 0: " + ", ".join(f"{k} {v or '-'}" for k, v in rows[0]["versions"].items()))
    launch = report.launch
    where = f"{launch.world_size} rank(s) on {launch.nodes} node(s)"
    if report.allreduce:
        small, *large = report.allreduce
        lines.append(f"all-reduce ({report.backend}, {where}): latency {small['seconds'] * 1e6:.0f} us at "
                     f"{small['bytes']} B; " + "; ".join(
                         f"{r['bytes'] / 2**20:g} MiB: {r['seconds'] * 1e3:.2f} ms, algbw {r['algbw_gbps']:.3f} GB/s, "
                         f"busbw {r['busbw_gbps']:.3f} GB/s" for r in large)
                     + "  (busbw = bytes / time x 2(n-1)/n, as nccl-tests)")
    else:
        lines.append(f"all-reduce ({report.backend}, {where}): one rank, nothing to measure")
    for level, node, rank, text in report.problems:
        lines.append(f"{level} node {node} rank {rank}: {text}")
    failed = sorted({(node, rank) for level, node, rank, _ in report.problems if level == "FAIL"})
    lines.append("doctor: " + (f"FAIL at {', '.join(f'node {n} rank {r}' for n, r in failed)}" if failed else
                               f"ok, {where} agree"))
    return "\n".join(lines)


def run_doctor(config: str | None, overrides: list[str], timeout: float = 60.0,
               allreduce_bytes: list[int] | None = None) -> Report:
    """Join, compare and measure; every rank returns the same report (its problems decide the exit status)."""
    import torch
    import torch.distributed as dist

    launch = launch_from_env()
    gpu = torch.cuda.is_available()
    report = Report(launch, backend="nccl" if gpu else "gloo")
    if launch.world_size == 1:
        report.rows = [rank_facts(config, overrides, launch)]
        report.problems = find_problems(report.rows, launch)
        return report
    store = join(launch, timeout)
    device = torch.device(f"cuda:{launch.local_rank % torch.cuda.device_count()}" if gpu else "cpu")
    if gpu:
        torch.cuda.set_device(device)
    # every rank has joined: the collectives wait as long as a node's first process needs to hash the files
    dist.init_process_group(report.backend, store=dist.PrefixStore(_key(launch, "pg"), store), rank=launch.rank,
                            world_size=launch.world_size, timeout=timedelta(seconds=max(timeout, COLLECTIVE_TIMEOUT)))
    try:
        facts = rank_facts(config, overrides, launch)
        facts["output_dir_shared"] = output_dir_shared(facts.get("output_dir"), launch)
        report.rows = [None] * launch.world_size
        dist.all_gather_object(report.rows, facts)
        sizes = allreduce_bytes or ([8, 2**20, 2**24] if not gpu else [8, 2**24, 2**28])
        report.allreduce = measure_allreduce(sizes, device)
        report.problems = find_problems(report.rows, launch)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return report
