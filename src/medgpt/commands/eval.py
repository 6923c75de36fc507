"""`medgpt eval mcq|gen|ppl|judge|safety|compare`: multiple-choice accuracy, BLEU/ROUGE of generated answers, answer
perplexity, a judge model's grades, refusal rates, side-by-side tables with paired confidence intervals."""

from __future__ import annotations

import argparse
from pathlib import Path


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder or hub id (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", help="LoRA adapter folder on top of --model")
    parser.add_argument("--template", help="chat template (default: the one saved with the model, else the "
                                           "tokenizer's); mcq: 'none' scores a plain-text prompt (base models)")
    parser.add_argument("--dtype", default="auto", help="auto, fp32, bf16, fp16 (default: auto)")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--limit", type=int, help="evaluate only the first N items (per subject for mcq)")


def _answering_arguments(parser: argparse.ArgumentParser, output: str, max_new_tokens: int) -> None:
    """How --model answers when it generates (judge, safety), and where the result goes."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="answer length when --model "
                                                                                  "generates")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--system", help="system prompt for generation")
    parser.add_argument("--output", default=output, help="result JSON; items go to NAME.items.jsonl")


def _judge_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--judge-url", required=required,
                        help="base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--judge-model", help="the judge's model name (default: the server's only model)")
    parser.add_argument("--judge-api-key-env", default="MEDGPT_JUDGE_API_KEY",
                        help="environment variable holding the API key (default MEDGPT_JUDGE_API_KEY, else "
                             "OPENAI_API_KEY)")
    parser.add_argument("--concurrency", type=int, default=8, help="judge requests in flight (default: 8)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per judge request (default: 60)")
    parser.add_argument("--retries", type=int, default=3, help="retries of a failed judge request (default: 3)")
    parser.add_argument("--judge-max-tokens", type=int, default=512, help="verdict length limit (default: 512)")
    parser.add_argument("--judge-json-schema", action="store_true",
                        help="ask for the verdict's JSON schema (response_format; vLLM, OpenAI, medgpt serve)")
    parser.add_argument("--judge-explanation-chars", type=int,
                        help="with --judge-json-schema: the explanation's maxLength (keeps a small judge short)")
    parser.add_argument("--judge-cache", help="verdict cache, a SQLite file (default: ~/.cache/medgpt/judge.sqlite)")


def _judge_settings(args: argparse.Namespace):
    from medgpt.eval.judge import JudgeSettings

    if not args.judge_url:
        return None
    return JudgeSettings(url=args.judge_url, model=args.judge_model, api_key_env=args.judge_api_key_env,
                         concurrency=args.concurrency, timeout=args.timeout, retries=args.retries,
                         max_tokens=args.judge_max_tokens, json_schema=args.judge_json_schema,
                         explanation_chars=args.judge_explanation_chars, cache=args.judge_cache)


def _answer_source(args: argparse.Namespace, output: Path):
    from medgpt.eval.judge import AnswerSource

    return AnswerSource(predictions=args.predictions, model=None if args.predictions else args.model,
                        adapter=args.adapter, template=args.template, dtype=args.dtype,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, system=args.system,
                        trust_remote_code=args.trust_remote_code,
                        partial=output.with_name(f".{output.stem}.partial.jsonl"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    mcq = sub.add_parser("mcq", help="multiple-choice accuracy (C-Eval, CMMLU, MedQA, MedMCQA, PubMedQA, MMLU, "
                                     "CMB, CMExam, MedXpertQA)",
                         description="Accuracy per subject and overall, with its 95%% interval, on multiple-choice "
                                     "benchmarks in their own published layouts (2-10 options, multiple-answer and "
                                     "yes/no/maybe questions), from local CSV/JSON/jsonl/parquet files, a folder, "
                                     "or a hub data set (subsets = subjects).")
    _model_arguments(mcq)
    mcq.add_argument("--data", required=True,
                     help="CSV/jsonl file, a folder of them, a C-Eval-style root with dev/ and val/, or a hub "
                          "data set (ceval/ceval-exam, haonan-li/cmmlu)")
    mcq.add_argument("--split", default="val", help="split to score: val, test, dev (default: val)")
    mcq.add_argument("--subjects", help="comma-separated subjects (hub default: the medical ones)")
    mcq.add_argument("--subject", help="the subject of every question (default: each row's `subject` field, else "
                                       "the file name); official C-Eval/CMMLU names get their Chinese name")
    mcq.add_argument("--shots", type=int, default=0, help="few-shot examples from the dev split (default: 0)")
    mcq.add_argument("--dev", help="where few-shot examples come from (default: the dev folder beside --data)")
    mcq.add_argument("--format", help="the benchmark layout: medqa_hf, medqa, medqa_mcmle, medmcqa, pubmedqa, mmlu, "
                                      "cmb, cmexam, medxpertqa, ceval (default: detected from the fields)")
    mcq.add_argument("--style", choices=("ceval", "cmmlu", "mmlu", "medqa", "medmcqa", "pubmedqa", "cmb"),
                     help="prompt wording (default: the format's own: ceval for C-Eval/CMMLU rows, lm-eval's for "
                          "MedQA, MedMCQA, PubMedQA and MMLU)")
    mcq.add_argument("--method", default="loglik", choices=("loglik", "generate"),
                     help="loglik: likeliest answer (letter, answer set or label); generate: greedy reply, its "
                          "answer read after any reasoning")
    mcq.add_argument("--batch-size", type=int, default=8)
    mcq.add_argument("--max-length", type=int, default=2048, help="prompt token limit; shots are dropped to fit")
    mcq.add_argument("--max-new-tokens", type=int, default=32, help="reply length for --method generate")
    mcq.add_argument("--output", default="eval_mcq.json", help="result JSON; items go to NAME.items.jsonl")
    mcq.add_argument("--emit-lm-eval-task", metavar="DIR",
                     help="write lm-evaluation-harness tasks (YAML + jsonl per subject) that score what this command "
                          "scores with --template none, and exit without loading a model")
    gen = sub.add_parser("gen", help="BLEU-1..4 and ROUGE-1/2/L of generated answers",
                         description="Generate answers for {question, answer} rows and score BLEU-1..4 "
                                     "(sacrebleu, on characters for Chinese and words for English) and ROUGE-1/2/L "
                                     "(rouge-chinese on Chinese tokens without punctuation where the reference holds "
                                     "Chinese, else rouge-score as it ships); or score an existing --predictions "
                                     "file.")
    _model_arguments(gen)
    gen.add_argument("--data", help="jsonl of {\"question\", \"answer\"}")
    gen.add_argument("--predictions", help="jsonl of {\"prediction\", \"answer\"}: score only, no model")
    gen.add_argument("--tokenize", default="char", choices=("char", "jieba"),
                     help="char: Chinese characters + English words (default); jieba: jieba words")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--batch-size", type=int, default=16)
    gen.add_argument("--system", help="system prompt for generation")
    gen.add_argument("--output", default="eval_gen.json", help="result JSON; items go to NAME.items.jsonl")
    ppl = sub.add_parser("ppl", help="perplexity of the reference answers given their prompts",
                         description="Mean negative log-likelihood (nats per token) and perplexity of the assistant "
                                     "tokens of {question, answer} rows or SFT conversations, through the chat "
                                     "template; per item and overall (summed over all answer tokens).")
    _model_arguments(ppl)
    ppl.add_argument("--data", required=True, help="jsonl of {\"question\", \"answer\"}, or SFT data in any format")
    ppl.add_argument("--batch-size", type=int, default=8)
    ppl.add_argument("--max-length", type=int, default=2048, help="token limit per conversation (longer are cut)")
    ppl.add_argument("--output", default="eval_ppl.json", help="result JSON; items go to NAME.items.jsonl")
    judge = sub.add_parser("judge", help="grade answers with a judge model over any OpenAI-compatible API",
                           description="Grade answers against rubrics (HealthBench's layout: prompt messages, "
                                       "rubrics [{criterion, points, tags}]), against reference answers ({question, "
                                       "answer}: a 0-10 score) or pairwise (A against --against B, both orders), with "
                                       "a judge model behind any OpenAI-compatible endpoint (vLLM, medgpt serve, a "
                                       "hosted API). Every verdict is cached; a rerun asks nothing twice.")
    _model_arguments(judge)
    judge.add_argument("--data", required=True, help="rubric rows (jsonl, HealthBench's layout) or {question, answer} "
                                                     "rows")
    judge.add_argument("--grading", choices=("rubric", "reference", "pairwise"),
                       help="default: rubric where the rows have rubrics, else reference")
    judge.add_argument("--predictions", help="jsonl of {\"prediction\"} (with the rows' prompt_id/id, else in order): "
                                             "the answers to grade; without it --model generates them")
    judge.add_argument("--against", help="pairwise: jsonl of {\"prediction\"}, the answers B that A is compared with")
    _answering_arguments(judge, "eval_judge.json", max_new_tokens=512)
    _judge_arguments(judge, required=True)
    safety = sub.add_parser("safety", help="refusal rate on harmful requests, over-refusal on look-alike benign ones",
                            description="Answers to the shipped safety sets (harmful.jsonl: requests to decline or "
                                        "redirect; benign.jsonl: look-alike requests to answer), classified as "
                                        "refusals by the judge (--judge-url) or by a refusal-phrase matcher.")
    _model_arguments(safety)
    safety.add_argument("--sets", help="folder with harmful.jsonl and benign.jsonl (default: the shipped sets)")
    safety.add_argument("--predictions", help="jsonl of {\"id\", \"prediction\"} for both sets' ids: classify "
                                              "these instead of generating")
    safety.add_argument("--classifier", choices=("judge", "phrases"),
                        help="default: judge with --judge-url, else phrases")
    _answering_arguments(safety, "eval_safety.json", max_new_tokens=256)
    _judge_arguments(safety, required=False)
    comp = sub.add_parser("compare", help="side-by-side table of result files with deltas and paired intervals",
                          description="Compare result files (eval mcq/gen/ppl JSON or any JSON of numbers); deltas "
                                      "are to the first file. Where both files hold items, each delta gets its "
                                      "95% paired-bootstrap interval (2000 draws, seed 0), 'not significant' where "
                                      "it crosses 0, and McNemar's exact p for accuracy.")
    comp.add_argument("files", nargs="+", help="result JSON files")
    comp.add_argument("--labels", help="comma-separated column names (default: file names)")
    comp.add_argument("--markdown", help="also write the table as markdown to this file")
    comp.add_argument("--format", default="text", choices=("text", "markdown"), help="what to print")


def run(args: argparse.Namespace) -> int:
    return {"mcq": _mcq, "gen": _gen, "ppl": _ppl, "judge": _judge, "safety": _safety,
            "compare": _compare}[args.action](args)


def _mcq(args: argparse.Namespace) -> int:
    from medgpt.eval.gen import write_result
    from medgpt.eval.mcq import McqArgs, run_mcq, write_lm_eval_tasks
    from medgpt.eval.stats import standard_error

    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    mcq_args = McqArgs(data=args.data, split=args.split, dev=args.dev, subjects=subjects, subject=args.subject,
                       shots=args.shots, style=args.style, method=args.method, batch_size=args.batch_size,
                       max_length=args.max_length, max_new_tokens=args.max_new_tokens, limit=args.limit,
                       format=args.format)
    if args.emit_lm_eval_task:
        written = write_lm_eval_tasks(mcq_args, args.emit_lm_eval_task)
        print(f"written: {len(written)} lm-eval task(s) in {args.emit_lm_eval_task}; run them with\n"
              f"  lm_eval --model hf --model_args pretrained=MODEL --include_path {args.emit_lm_eval_task} "
              f"--tasks {','.join(p.stem for p in written)}")
        return 0
    result = run_mcq(args.model, mcq_args, adapter=args.adapter, template=args.template, dtype=args.dtype,
                     trust_remote_code=args.trust_remote_code)
    output, items = write_result(result, args.output)
    for subject, s in result["subjects"].items():
        print(f"  {subject:32s} {s['accuracy']:6.2f}  ({s['correct']}/{s['total']})")
    o = result["overall"]
    ci = result.get("ci95", {}).get("accuracy")
    print(f"  {'overall':32s} {o['accuracy']:6.2f}  ({o['correct']}/{o['total']}; subject average {o['average']:.2f}; "
          f"standard error ±{standard_error(o['correct'], o['total']):.1f} points"
          + (f"; 95% interval {ci[0]:.1f}-{ci[1]:.1f}" if ci else "") + ")")
    _print_reasoning(result)
    print(f"written: {output} and {items}")
    return 0


def _print_reasoning(result: dict) -> None:
    """The reasoning line of generated replies (eval mcq --method generate, eval gen), where any reasoned."""
    if r := result.get("reasoning"):
        print(f"  reasoning: {r['with_reasoning']}/{r['replies']} replies, mean {r['mean_chars']:.0f} characters; "
              f"{r['cut_in_reasoning']} cut inside their reasoning (unanswered)")


def _ppl(args: argparse.Namespace) -> int:
    from medgpt.eval.gen import write_result
    from medgpt.eval.ppl import run_ppl

    result = run_ppl(args.model, args.data, adapter=args.adapter, template=args.template, batch_size=args.batch_size,
                     max_length=args.max_length, limit=args.limit, dtype=args.dtype,
                     trust_remote_code=args.trust_remote_code)
    output, items = write_result(result, args.output)
    m = result["metrics"]
    print(f"  answer NLL {m['nll']:.4f} nats/token, perplexity {m['ppl']:.2f}  ({result['n']} items, "
          f"{result['tokens']} answer tokens)")
    print(f"written: {output} and {items}")
    return 0


def _gen(args: argparse.Namespace) -> int:
    from medgpt.eval.gen import run_gen, write_result

    output = Path(args.output)
    result = run_gen(args.data, model=args.model, predictions=args.predictions, adapter=args.adapter,
                     template=args.template, mode=args.tokenize, max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size, system=args.system, limit=args.limit, dtype=args.dtype,
                     trust_remote_code=args.trust_remote_code,
                     partial=output.with_name(f".{output.stem}.partial.jsonl"))
    output, items = write_result(result, output)
    print("  " + "  ".join(f"{k} {v:.2f}" for k, v in result["metrics"].items()) + f"  ({result['count']} items)")
    _print_reasoning(result)
    print(f"written: {output} and {items}")
    return 0


def _calls_line(calls: dict) -> str:
    line = (f"  judge {calls['judge']}: {calls['requests']} requests ({calls['retries']} retries), "
            f"{calls['cache_hits']} cached verdicts, {calls['failed']} failed")
    for error, n in calls["errors"].items():
        line += f"\n    {n} x {error}"
    return line


def _interval(s: dict, scale: float = 1.0) -> str:
    if s["mean"] is None:
        return "n/a (nothing graded)"
    return f"{scale * s['mean']:.3g} [{scale * s['ci95'][0]:.3g}, {scale * s['ci95'][1]:.3g}] (n={s['n']})"


def _judge(args: argparse.Namespace) -> int:
    from medgpt.eval.gen import write_result
    from medgpt.eval.judge import JudgeRun, run_judge

    output = Path(args.output)
    result = run_judge(JudgeRun(data=args.data, judge=_judge_settings(args), answers=_answer_source(args, output),
                                grading=args.grading, against=args.against, limit=args.limit))
    output, items = write_result(result, output)
    if result["grading"] == "pairwise":
        for key in ("win", "tie", "loss"):
            print(f"  {key:6s} {_interval(result[key])}")
    else:
        print(f"  score  {_interval(result['score'])}" + ("  (0-10)" if result["grading"] == "reference" else ""))
        for tag, s in result.get("tags", {}).items():
            print(f"    {tag:30s} {_interval(s)}")
    print(f"  graded {result['items_graded']}/{result['items_total']} items; verdicts: "
          + ", ".join(f"{k} {v}" for k, v in sorted(result["verdicts"].items())))
    print(_calls_line(result["calls"]))
    print(f"written: {output} and {items}")
    if result["calls"]["failed"]:
        print(f"medgpt eval judge: {result['calls']['failed']} judge call(s) failed; the verdicts received are cached, "
              f"so running the same command again asks only for the missing ones")
        return 1
    return 0


def _safety(args: argparse.Namespace) -> int:
    from medgpt.eval.gen import write_result
    from medgpt.eval.safety import run_safety

    output = Path(args.output)
    result = run_safety(_answer_source(args, output), judge=_judge_settings(args), classifier=args.classifier,
                        sets=args.sets, limit=args.limit)
    output, items = write_result(result, output)
    print(f"  classifier: {result['classifier']}")
    for name, metric in (("harmful", "refusal_rate"), ("benign", "over_refusal_rate")):
        s = result[name]
        print(f"  {name:8s} {metric:18s} {_interval(s[metric], 100)} %  ({s['unanswered']} unanswered, "
              f"{s['ungraded']} ungraded)")
    if "calls" in result:
        print(_calls_line(result["calls"]))
    print(f"written: {output} and {items}")
    return 1 if result.get("calls", {}).get("failed") else 0


def _compare(args: argparse.Namespace) -> int:
    from medgpt.eval.compare import compare, markdown_table, to_text

    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    table = compare(args.files, labels)
    markdown = markdown_table(table)
    print(markdown if args.format == "markdown" else to_text(table), end="")
    if args.markdown:
        from medgpt.files import atomic_write

        atomic_write(args.markdown, markdown)
        print(f"written: {args.markdown}")
    return 0
