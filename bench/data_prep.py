"""Preparing SFT data at the size users train on: medgpt's prepared-data path against the plain `datasets` path.

Generates N synthetic ShareGPT conversations (1-3 turns, Chinese and English) and, in one invocation and on the
same file and settings (the bundled tokenizer, template chatml, max_length 1024), measures:
- baseline: what LLaMA-Factory and TRL users run, `datasets.load_dataset("json")` + `map(apply_chat_template,
  tokenize, num_proc)`, in a fresh cache;
- medgpt: `medgpt data prepare` (read, validate, template, tokens and labels, length rule, cached Arrow), first
  run in a fresh cache and the cached re-run;
- `medgpt train` on the prepared data: seconds from its start to its first optimizer step (the bundled model).
Each is a separate process; its peak memory is the peak of the summed PSS of the whole process tree (workers
included; memory-mapped pages count once), read from /proc/PID/smaps_rollup once a second (reading smaps takes
the measured process's memory lock, so sampling more often slows what it measures).

Runs accumulate in the results file per N: each invocation adds one baseline run and one medgpt run (in turn, the
baseline first), and the table reports medians over all runs so far, so alternating runs of a size that does not
fit one invocation's time are separate invocations. `--parts medgpt` leaves the baseline out (the 2M goal is
medgpt's own peak against its 500k peak). Results in bench/results/data_prep.json.

    .venv/bin/python bench/data_prep.py [--records 100000 500000] [--num-proc 2] [--parts baseline medgpt]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

ZH = ["发热三天伴咳嗽，需要做哪些检查？", "高血压患者可以喝咖啡吗？", "孩子手足口病期间饮食要注意什么？",
      "糖尿病人空腹血糖多少算控制良好？", "服用华法林时哪些食物需要避免？"]
EN = ["How long should a fever last before I see a doctor?", "Is it safe to take ibuprofen with lisinopril?",
      "What are the early signs of type 2 diabetes?", "How should an asthma inhaler be used correctly?"]
ZH_REPLY = "建议及时就医，由医生根据病史和检查结果判断。平时注意休息、规律饮食，并按医嘱用药。"
EN_REPLY = ("Please see a clinician, who can judge from your history and an examination. Rest, drink fluids and "
            "take medicines only as prescribed.")


def generate(path: Path, count: int, seed: int = 0) -> None:
    """ShareGPT records of 1-3 turns, half Chinese, half English, replies of varied length."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(count):
            zh = rng.random() < 0.5
            turns = []
            for _ in range(rng.randint(1, 3)):
                turns.append({"from": "human", "value": rng.choice(ZH if zh else EN)})
                turns.append({"from": "gpt", "value": (ZH_REPLY if zh else EN_REPLY) * rng.randint(1, 6)})
            f.write(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n")


BASELINE = textwrap.dedent("""
    import sys
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from medgpt.models import resolve_model
    path, cache, num_proc = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tokenizer = AutoTokenizer.from_pretrained(resolve_model())
    roles = {"human": "user", "gpt": "assistant"}
    def encode(row):
        messages = [{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        return {"input_ids": ids[:1024]}
    ds = load_dataset("json", data_files=path, split="train", cache_dir=cache)
    ds = ds.map(encode, remove_columns=ds.column_names, num_proc=num_proc)
    print(len(ds))
""")


def tree_pss(root: psutil.Process) -> int:
    """Summed PSS (bytes) of `root` and its descendants, from smaps_rollup."""
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            with open(f"/proc/{p.pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:")) * 1024
        except (OSError, StopIteration):
            pass
    return total


def measure(command: list[str], env: dict, interval: float = 1.0) -> dict:
    """Wall time and the peak summed PSS of the process tree of `command`."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # a pipe's buffer would fill
        start = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        root, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                peak = max(peak, tree_pss(root))
            except psutil.NoSuchProcess:
                break
            time.sleep(interval)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"{' '.join(command[:4])}... failed:\n{err.read()[-3000:]}")
        return {"wall_s": round(wall, 1), "peak_pss_gb": round(peak / 2**30, 2), "stdout": out.read().strip()}


def first_step(config: Path, env: dict, out: Path, model: Path) -> float:
    """Seconds from starting `medgpt train` on the prepared data to its first logged optimizer step, with a
    2-layer model of the bundled tokenizer: the time is the data's and the trainer's setup, not the step's compute
    (a step of the 135M model on a 1,024-token row takes tens of seconds on these CPUs)."""
    log = out / "metrics.jsonl"
    command = [str(Path(PY).parent / "medgpt"), "train", str(config), "--model", str(model), "--max_steps", "1",
               "--logging_steps", "1",
               "--per_device_train_batch_size", "1", "--save_strategy", "no", "--report_to", "none",
               "--report_prompts", "none", "--output_dir", str(out)]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        while proc.poll() is None and not (log.exists() and '"loss"' in log.read_text()):
            time.sleep(0.1)
        took = time.perf_counter() - start
        proc.wait()
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"medgpt train failed:\n{err.read()[-3000:]}")
    return round(took, 1)


def run_size(count: int, num_proc: int, work: Path, model: Path, parts: list[str], earlier: dict) -> dict:
    """One more run of each of `parts` on N=`count` records, added to the `earlier` runs of that size."""
    data = work / f"sharegpt-{count}.jsonl"
    generate(data, count)
    config = work / f"sft-{count}.yaml"
    config.write_text(f"stage: sft\ndata: {data}\ntemplate: chatml\nmax_length: 1024\noverlong: truncate\n"
                      f"dataset_num_proc: {num_proc}\noutput_dir: {work / 'out'}\n"
                      f"data_cache_dir: {work / f'prepared-{count}'}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(work / f"hf-{count}")}
    result = {"records": count, "file_mb": round(data.stat().st_size / 2**20, 1),
              "runs": {key: list(earlier.get("runs", {}).get(key, [])) for key in ("baseline", "medgpt", "medgpt_cached")}}
    for key in ("rows", "tokens", "train_first_step_s"):
        if key in earlier:
            result[key] = earlier[key]
    if "baseline" in parts:
        run = measure([PY, "-c", BASELINE, str(data), str(work / f"baseline-{count}"), str(num_proc)], env)
        result["runs"]["baseline"].append({k: v for k, v in run.items() if k != "stdout"})
        print(f"{count} baseline {run['wall_s']} s {run['peak_pss_gb']} GB", flush=True)
    if "medgpt" in parts:
        medgpt = [str(Path(PY).parent / "medgpt"), "data", "prepare", "--json", str(config)]
        for key in ("medgpt", "medgpt_cached"):
            run = measure(medgpt, env)
            report = json.loads(run.pop("stdout"))
            result["runs"][key].append(run)
            print(f"{count} {key} {run['wall_s']} s {run['peak_pss_gb']} GB", flush=True)
        result["rows"], result["tokens"] = report["train"]["rows"], report["train"]["tokens"]
        result["train_first_step_s"] = first_step(config, env, work / f"train-{count}", model)
        print(f"{count} first step {result['train_first_step_s']} s", flush=True)
    data.unlink()
    return summarize(result)


def summarize(result: dict) -> dict:
    """Medians (wall, peak) over the runs of each path, and medgpt's wall time over the baseline's."""
    for key, runs in result["runs"].items():
        if runs:
            result[key] = {"wall_s": statistics.median(r["wall_s"] for r in runs),
                           "peak_pss_gb": statistics.median(r["peak_pss_gb"] for r in runs), "runs": len(runs)}
    if "baseline" in result and "medgpt" in result:
        result["wall_ratio_medgpt_over_baseline"] = round(result["medgpt"]["wall_s"] / result["baseline"]["wall_s"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, nargs="+", default=[100_000])
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--parts", nargs="+", choices=("baseline", "medgpt"), default=["baseline", "medgpt"])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "data_prep.json"))
    args = parser.parse_args()
    path = Path(args.out)
    earlier = json.loads(path.read_text()) if path.exists() else {}
    sizes = {s["records"]: s for s in earlier.get("sizes", []) if "runs" in s and earlier.get("num_proc") == args.num_proc}
    with tempfile.TemporaryDirectory(prefix="medgpt-data-prep-") as tmp:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import build_tiny_model  # the tests' 2-layer Llama with the bundled tokenizer

        model = build_tiny_model(Path(tmp) / "tiny")
        for n in args.records:
            sizes[n] = run_size(n, args.num_proc, Path(tmp), model, args.parts, sizes.get(n, {}))
            write(path, args.num_proc, earlier, sizes)


def write(path: Path, num_proc: int, earlier: dict, sizes: dict) -> None:
    out = {"machine": {"cpus": len(os.sched_getaffinity(0)), "memory_gb": round(psutil.virtual_memory().total / 2**30),
                       "python": platform.python_version()}, "num_proc": num_proc,
           "sizes": [sizes[n] for n in sorted(sizes)]}
    out.update({k: v for k, v in earlier.items() if k not in out and k != "not_measured"})
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"written {path}", flush=True)


if __name__ == "__main__":
    main()
