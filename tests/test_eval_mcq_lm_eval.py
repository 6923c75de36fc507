"""`medgpt eval mcq` agrees with lm-evaluation-harness: the reference is lm-eval's own `hf` model scoring the
tasks `eval mcq --emit-lm-eval-task` writes (the same prompts, letters and few-shot rows), on the bundled model.
lm-eval's task loader is the reference for the prompts, its `hf` model for the letters and log-likelihoods."""

from __future__ import annotations

import json
import math

import pytest

from medgpt.cli import main

pytestmark = pytest.mark.slow

LIMIT = 2  # questions per subject: 6 in all


def test_emitted_lm_eval_task_renders_medgpts_prompt(sample_data, tmp_path):
    """Reference: lm-eval's own task loader renders the emitted YAML to exactly medgpt's plain-text prompt."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from medgpt.eval import mcq

    assert main(["eval", "mcq", "--data", str(sample_data / "mcq"), "--subjects", "physician", "--limit", "2",
                 "--shots", "2", "--emit-lm-eval-task", str(tmp_path)]) == 0
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)  # only the emitted tasks
    task = get_task_dict(["medgpt_physician"], tasks)["medgpt_physician"]
    doc = next(iter(task.test_docs()))
    q = mcq.load_questions(str(sample_data / "mcq"), subjects=["physician"])["physician"][0]
    dev = mcq.load_questions(str(sample_data / "mcq"), "dev", subjects=["physician"])["physician"]
    assert task.fewshot_context(doc, 0) == mcq.prompt_text(q, [], "ceval")
    assert task.fewshot_context(doc, 2) == mcq.prompt_text(q, dev[:2], "ceval")
    assert task.doc_to_choice(doc) == list(mcq.LETTERS) and task.doc_to_target(doc) == "ABCD".index(q.answer)


@pytest.fixture(scope="module")
def harness_run(bundled_model, sample_data, benchmark_tasks, tmp_path_factory):
    """lm-eval's `hf` model, loaded once, on the emitted tasks and on its own four benchmark tasks, zero-shot
    (few-shot prompts are checked by rendering above)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager, get_task_dict

    tasks = tmp_path_factory.mktemp("lm-eval-tasks")
    assert main(["eval", "mcq", "--data", str(sample_data / "mcq"), "--limit", str(LIMIT),
                 "--emit-lm-eval-task", str(tasks)]) == 0
    names = sorted(p.stem for p in tasks.glob("*.yaml"))
    assert names == ["medgpt_basic_medicine", "medgpt_clinical_medicine", "medgpt_physician"]
    emitted = get_task_dict(names, TaskManager(include_path=str(tasks), include_defaults=False))
    benchmarks, _ = benchmark_tasks
    return simple_evaluate(model="hf", model_args=f"pretrained={bundled_model},dtype=float32",
                           tasks=[*emitted.values(), *benchmarks.values()], log_samples=True, batch_size=16,
                           device="cpu")


def test_eval_mcq_picks_the_letters_lm_eval_picks(harness_run, bundled_model, sample_data, tmp_path):
    result = tmp_path / "mcq.json"
    assert main(["eval", "mcq", "--model", bundled_model, "--data", str(sample_data / "mcq"), "--limit", str(LIMIT),
                 "--template", "none", "--dtype", "fp32", "--output", str(result)]) == 0
    items = [json.loads(line) for line in (tmp_path / "mcq.items.jsonl").read_text().splitlines()]
    ours = {(i["subject"], i["id"]): i for i in items}
    assert len(ours) == 3 * LIMIT
    theirs = {}
    for task, samples in harness_run["samples"].items():
        if not task.startswith("medgpt_"):
            continue
        for sample in samples:
            logliks = [resp[0] for resp in sample["filtered_resps"]]
            theirs[(task.removeprefix("medgpt_"), sample["doc"]["id"])] = logliks
    assert theirs.keys() == ours.keys()
    for key, logliks in theirs.items():
        item = ours[key]
        assert item["pred"] == "ABCD"[max(range(4), key=logliks.__getitem__)], key
        for letter, theirs_ll in zip("ABCD", logliks):
            # medgpt pools each letter over its spellings ("A", " A"): at least lm-eval's "A", and close to it
            assert item["loglik"][letter] >= theirs_ll - 1e-3
            assert item["loglik"][letter] == pytest.approx(theirs_ll, abs=0.05)
    accuracy = 100 * sum(i["correct"] for i in items) / len(items)
    harness_acc = sum(harness_run["results"][t]["acc,none"] for t in harness_run["results"]
                      if t.startswith("medgpt_")) / 3
    assert accuracy == pytest.approx(100 * harness_acc, abs=1e-6)
    assert json.loads(result.read_text())["accuracy"] == pytest.approx(accuracy, abs=0.01)
    assert not math.isnan(accuracy)


# ---- lm-eval's own medqa_4options, medmcqa, pubmedqa and mmlu_* tasks on fixtures in each benchmark's layout ----

BENCHMARKS = {  # lm-eval task -> (fixture under tests/fixtures/benchmarks, the split its YAML scores)
    "medqa_4options": ("medqa_hf/test.jsonl", "test"), "medmcqa": ("medmcqa/validation.parquet", "validation"),
    "pubmedqa": ("pubmedqa/test.jsonl", "test"), "mmlu_clinical_knowledge": ("mmlu/clinical_knowledge.jsonl", "test"),
}


@pytest.fixture(scope="module")
def benchmark_tasks():
    """lm-eval's shipped task YAMLs (its prompt functions, choices, delimiters), pointed at the local fixtures."""
    from pathlib import Path

    import lm_eval
    from lm_eval.tasks import TaskManager, get_task_dict
    from lm_eval.tasks._yaml_loader import load_yaml

    root = Path(lm_eval.__file__).parent / "tasks"
    manager = TaskManager(include_path=[str(root / d) for d in ("medqa", "medmcqa", "pubmedqa", "mmlu/default")],
                          include_defaults=False)  # index only these four folders
    fixtures = Path(__file__).parent / "fixtures" / "benchmarks"
    configs = []
    for task, (file, split) in BENCHMARKS.items():
        cfg = dict(load_yaml(manager.task_index[task].yaml_path, resolve_func=True))
        cfg.update(dataset_path="parquet" if file.endswith(".parquet") else "json", dataset_name=None,
                   dataset_kwargs={"data_files": {split: str(fixtures / file)}}, training_split=None,
                   validation_split=split if split == "validation" else None, test_split=split, fewshot_split=None,
                   fewshot_config=None)
        configs.append(cfg)
    return get_task_dict(configs, manager), fixtures


def _key(doc: dict, doc_id: int) -> str:
    return str(doc.get("id", doc.get("pubid", doc_id)))


def test_medgpt_renders_lm_evals_benchmark_prompts(benchmark_tasks):
    """Reference: lm-eval's own doc_to_text/doc_to_choice/doc_to_target of each task on each fixture row."""
    from medgpt.eval import mcq

    tasks, fixtures = benchmark_tasks
    for task, (file, _) in BENCHMARKS.items():
        t = tasks[task]
        fmt, questions = mcq.load_set(str(fixtures / file))
        ours = {q.id: q for qs in questions.values() for q in qs}
        docs = list(t.test_docs())
        assert len(docs) == len(ours) >= 3
        for i, doc in enumerate(docs):
            q = ours[_key(doc, i)]
            assert mcq.prompt_text(q, [], mcq.FORMATS[fmt].style) == t.fewshot_context(doc, 0), task
            assert list(q.keys) == t.doc_to_choice(doc)
            assert q.keys[t.doc_to_target(doc)] if isinstance(t.doc_to_target(doc), int) else \
                t.doc_to_target(doc) == q.answer


def test_eval_mcq_picks_what_lm_eval_picks_on_the_four_benchmarks(harness_run, benchmark_tasks, bundled_model):
    """The same choice per item and the same accuracy as lm-eval's `hf` model on medqa_4options, medmcqa,
    pubmedqa and mmlu_clinical_knowledge (zero-shot, plain text as lm-eval sends it: what `eval mcq --template
    none` runs, here on one loaded model)."""
    from medgpt.eval import mcq
    from medgpt.models import open_model

    _, fixtures = benchmark_tasks
    opened = open_model(bundled_model, template="none", dtype="fp32")
    scorer = mcq.LoglikScorer(opened.model, opened.tokenizer, opened.template, batch_size=16)
    for task, (file, _) in BENCHMARKS.items():
        fmt, questions = mcq.load_set(str(fixtures / file))
        scored = mcq.evaluate_loglik(scorer, questions, {}, mcq.FORMATS[fmt].style, chat=False, max_length=2048)
        items = {i["id"]: i for i in scored}
        samples = harness_run["samples"][task]
        assert len(samples) == len(items)
        for sample in samples:
            item = items[_key(sample["doc"], sample["doc_id"])]
            keys = list(item["loglik"])
            logliks = [resp[0] for resp in sample["filtered_resps"]]
            assert item["pred"] == keys[max(range(len(keys)), key=logliks.__getitem__)], (task, item["id"])
            for k, theirs in zip(keys, logliks):  # a letter pools "A" and " A": at least lm-eval's " A"
                assert item["loglik"][k] >= theirs - 1e-3
            assert item["loglik"][item["pred"]] == pytest.approx(max(logliks), abs=0.05)
        harness_acc = 100 * harness_run["results"][task]["acc,none"]
        assert mcq.summarize(scored)["overall"]["accuracy"] == pytest.approx(harness_acc, abs=0.01), task
