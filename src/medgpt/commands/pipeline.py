"""`medgpt pipeline CONFIG.yaml [--from STAGE] [--dry-run] [--key value | --STAGE.key value ...]`."""

from __future__ import annotations

import argparse

# Flags of this command that may also come after the config, among the overrides.
OWN_FLAGS = {"--from": "start_from", "--dry-run": "dry_run", "--no-report": "no_report"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="pipeline YAML: shared keys, `stages:` list, `output_dir:` run folder")
    parser.add_argument("--from", dest="start_from", metavar="STAGE",
                        help="train again from this stage (its name) on, even if finished")
    parser.add_argument("--dry-run", action="store_true", help="validate every stage and show what would run")
    parser.add_argument("--no-report", action="store_true", help="do not write report.md / report.html")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="--key value for every stage (--max_steps 5), --NAME.key value for one (--dpo.beta 0.2)")
    parser.epilog = ("Re-running the same config skips finished stages; a stage whose config or data changed "
                     "trains again, and so does every stage after it; an interrupted stage resumes.")


def split_own_flags(args: argparse.Namespace) -> list[str]:
    """Take this command's flags out of the overrides (argparse leaves them there when they follow CONFIG)."""
    rest, tokens = [], list(args.overrides)
    if args.config and args.config.startswith("--"):
        tokens, args.config = [args.config, *tokens], None
    while tokens:
        token = tokens.pop(0)
        key, eq, value = token.partition("=")
        if key == "--from":
            if not eq:
                if not tokens:
                    from medgpt.errors import UserError

                    raise UserError("--from needs a stage name")
                value = tokens.pop(0)
            args.start_from = value
        elif token in OWN_FLAGS:
            setattr(args, OWN_FLAGS[token], True)
        else:
            rest.append(token)
    return rest


def run(args: argparse.Namespace) -> int:
    from medgpt.files import is_main_process
    from medgpt.pipeline import final_model, load_pipeline, plan_steps, run_pipeline

    overrides = split_own_flags(args)
    pipeline = load_pipeline(args.config, overrides)
    if args.dry_run:
        print(f"run folder: {pipeline.run_dir}  (handoff: {pipeline.handoff})")
        for step in plan_steps(pipeline, args.start_from):
            stage = step.stage
            starts = stage.raw["model"] + (f" + adapter {stage.raw['adapter']}" if stage.raw.get("adapter") else "")
            starts += f", reward model {stage.raw['reward_model']}" if stage.raw.get("reward_model") else ""
            print(f"  {stage.name:<12} {stage.kind:<5} {step.action:<7} hash {step.hash}  from {starts}")
        return 0
    outcomes = run_pipeline(pipeline, args.start_from, report=not args.no_report)
    if not is_main_process():
        return 0  # under accelerate/torchrun every process runs the pipeline; one summary is enough
    print(f"pipeline finished: {pipeline.run_dir}")
    for o in outcomes:
        loss = o.metrics.get("train_loss")
        detail = f", train_loss {loss:.4g}" if isinstance(loss, (int, float)) else ""
        print(f"  {o.name:<12} {o.stage:<5} {'skipped (finished before)' if o.action == 'skip' else o.action}"
              f" in {o.seconds:.0f}s{detail} -> {o.output_dir}")
    final = final_model(pipeline)
    print(f"final model: {final['model']}" + (f" + adapter {final['adapter']}" if final["adapter"] else ""))
    if not args.no_report:
        print(f"report: {pipeline.run_dir / 'report.md'} and {pipeline.run_dir / 'report.html'}")
    return 0
