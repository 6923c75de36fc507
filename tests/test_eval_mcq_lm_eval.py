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
def harness_run(bundled_model, sample_data, tmp_path_factory):
    """lm-eval's `hf` model on the emitted tasks, zero-shot (few-shot prompts are checked by rendering above)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = tmp_path_factory.mktemp("lm-eval-tasks")
    assert main(["eval", "mcq", "--data", str(sample_data / "mcq"), "--limit", str(LIMIT),
                 "--emit-lm-eval-task", str(tasks)]) == 0
    names = sorted(p.stem for p in tasks.glob("*.yaml"))
    assert names == ["medgpt_basic_medicine", "medgpt_clinical_medicine", "medgpt_physician"]
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    out = simple_evaluate(model="hf", model_args=f"pretrained={bundled_model},dtype=float32", tasks=names,
                          task_manager=manager, log_samples=True, batch_size=8, device="cpu")
    return out


def test_eval_mcq_picks_the_letters_lm_eval_picks(harness_run, bundled_model, sample_data, tmp_path):
    result = tmp_path / "mcq.json"
    assert main(["eval", "mcq", "--model", bundled_model, "--data", str(sample_data / "mcq"), "--limit", str(LIMIT),
                 "--template", "none", "--dtype", "fp32", "--output", str(result)]) == 0
    items = [json.loads(line) for line in (tmp_path / "mcq.items.jsonl").read_text().splitlines()]
    ours = {(i["subject"], i["id"]): i for i in items}
    assert len(ours) == 3 * LIMIT
    theirs = {}
    for task, samples in harness_run["samples"].items():
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
    harness_acc = sum(harness_run["results"][t]["acc,none"] for t in harness_run["results"]) / 3
    assert accuracy == pytest.approx(100 * harness_acc, abs=1e-6)
    assert json.loads(result.read_text())["accuracy"] == pytest.approx(accuracy, abs=0.01)
    assert not math.isnan(accuracy)
