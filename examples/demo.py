"""The medgpt demo: PT -> SFT -> DPO on the bundled SmolLM2-135M-Instruct and the shipped medical sample
data (examples/pipeline_smollm2.yaml), then a report, and the base and tuned models' answers side by side.

    python examples/demo.py                      # `make demo`; a second run skips the finished stages
    python examples/demo.py --from sft           # train SFT and DPO again
    python examples/demo.py --max_steps 4        # any pipeline override
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
import time
import unicodedata
from itertools import zip_longest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "pipeline_smollm2.yaml"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything the demo needs ships with the packages
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning: on a small or shared CPU, spinning threads of one
# process steal the cores the others compute on (generation was 10x slower here without this).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def width_of(text: str) -> int:
    """Terminal columns: CJK characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def wrap(text: str, column: int) -> list[str]:
    """Lines of at most `column` terminal columns (words kept whole where there are spaces)."""
    lines = []
    for paragraph in (text or "(empty)").splitlines():
        for piece in textwrap.wrap(paragraph, column) or [""]:
            line = ""
            for char in piece:
                if width_of(line) + width_of(char) > column:
                    lines.append(line)
                    line = ""
                line += char
            lines.append(line)
    return lines


def side_by_side(title_left: str, left: str, title_right: str, right: str, width: int) -> str:
    """Two answers in two columns of the terminal."""
    column = max(20, (width - 3) // 2)
    rows = [(title_left, title_right), ("-" * column, "-" * column),
            *zip_longest(wrap(left, column), wrap(right, column), fillvalue="")]
    return "\n".join(f"{a}{' ' * (column - width_of(a))} | {b}" for a, b in rows)


def shown(answer: dict) -> str:
    """An answer of the report's answers.json, with the mark of one cut at the token limit."""
    cut = answer.get("finish_reason") == "length"
    return answer["text"] + (f" [cut at {answer.get('completion_tokens')} tokens]" if cut else "")


def print_evaluation(summary_file: Path, width: int) -> None:
    """What each stage changed on the held-out sets, with the 95% interval of the paired difference."""
    import json

    from medgpt.report.labels import EVAL_METRICS, eval_metric_name, metric_text

    if not summary_file.exists():
        return
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    print("\n" + "=" * width)
    print("held-out evaluation: change per stage (after - before, 95% confidence interval of the paired difference)")
    for c in summary["changes"]:
        metric = c["metric"]
        if metric not in EVAL_METRICS:
            continue
        lo, hi = c.get("ci95") or (None, None)
        values = f"{metric_text(metric, c.get('before')):>8} -> {metric_text(metric, c.get('after')):>8}"
        interval = f"[{metric_text(metric, lo)}, {metric_text(metric, hi)}]"
        verdict = "significant" if c.get("significant") else "not significant"
        print(f"  {c['stage']:<10} {eval_metric_name(c['set'], metric):<44} {values}  {interval}  {verdict}")


def main(argv: list[str]) -> int:
    import json
    import logging
    from argparse import Namespace

    from medgpt.commands.pipeline import split_own_flags
    from medgpt.errors import UserError
    from medgpt.pipeline import final_model, load_pipeline, run_pipeline

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.chdir(ROOT)  # the config's data paths are relative to the repository
    args = Namespace(config=None, overrides=argv, start_from=None, dry_run=False, no_report=False)
    started = time.time()
    try:
        overrides = split_own_flags(args)
        if args.dry_run or args.no_report:
            raise UserError(f"--dry-run and --no-report belong to `medgpt pipeline {CONFIG.relative_to(ROOT)}`")
        pipeline = load_pipeline(CONFIG, overrides)
        outcomes = run_pipeline(pipeline, args.start_from)
    except UserError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.time() - started

    logging.getLogger().setLevel(logging.WARNING)  # the summary below, without log lines in between
    width = shutil.get_terminal_size((120, 40)).columns
    last = pipeline.stages[-1].name
    answers = json.loads((pipeline.run_dir / "answers.json").read_text(encoding="utf-8"))
    from medgpt.report.answers import load_prompts

    print("\n" + "=" * width)
    print(f"medgpt demo: {' -> '.join(s.name.upper() for s in pipeline.stages)} on {pipeline.base['model']}")
    for o in outcomes:
        state = "finished before, skipped" if o.action == "skip" else f"{o.action}, {o.seconds:.0f}s"
        print(f"  {o.name:<4} {state}")
    for i, messages in enumerate(load_prompts(pipeline.report_prompts)):
        print("\n" + "=" * width)
        print("\n".join(wrap(f"Q{i + 1}: {messages[-1]['content']}", width)))
        print(side_by_side("base model", shown(answers["base"]["answers"][i]), f"after {last}",
                           shown(answers[last]["answers"][i]), width))
    print_evaluation(pipeline.run_dir / "eval" / "summary.json", width)
    final = final_model(pipeline)
    print("\n" + "=" * width)
    print(f"tuned model: {final['model']}")
    print(f"report:      {pipeline.run_dir / 'report.md'}  (self-contained: {pipeline.run_dir / 'report.html'})")
    print(f"chat:        medgpt chat --model {final['model']}")
    print(f"demo time:   {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
