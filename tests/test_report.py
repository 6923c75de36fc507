"""Run reports: settings, curves as embedded PNG plots with labelled axes, final metrics, data counts, answers side
by side (cached, cut ones marked)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import trl
from matplotlib.figure import Figure

from medgpt.data.stats import DataStats
from medgpt.errors import UserError
from medgpt.report import write_report
from medgpt.report.answers import ModelRef, load_prompts
from medgpt.report.document import StageResult
from medgpt.report.plots import plot_curves
from medgpt.train import ppo


def fake_stage(folder, rows):
    """A stage folder as a DPO run leaves it: metrics log, final metrics, data counts."""
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')
    (folder / "final_metrics.json").write_text(json.dumps({"train_loss": 0.61, "epoch": 1.0, "note": "x"}))
    stats = DataStats(read=72)
    for i in range(3):
        stats.drop("longer than max_length", f"pref.jsonl:{i + 1}")
    stats.drop("identical chosen and rejected", "pref.jsonl:9")
    (folder / "data_stats.json").write_text(json.dumps({"train": stats.to_dict()}))


def test_report_has_plots_metrics_data_and_answers(tiny_model, tmp_path, monkeypatch):
    model = str(shutil.copytree(tiny_model, tmp_path / "model"))
    rows = [{"step": s, "loss": 0.7 - 0.05 * s, "rewards/margins": 0.1 * s, "rewards/chosen": 0.05 * s,
             "rewards/accuracies": 0.5 + 0.1 * s, "learning_rate": 1e-4} for s in range(1, 5)]
    fake_stage(tmp_path / "dpo", rows)
    prompts = load_prompts(None)
    assert len(prompts) == 6 and all(p[-1]["role"] == "user" for p in prompts)
    results = [StageResult("dpo", "dpo", tmp_path / "dpo", ModelRef(model, None, "chatml"))]
    report = write_report(tmp_path, results, ModelRef(model, None, "chatml"), prompts, max_new_tokens=3)

    md = report.read_text()
    page = (tmp_path / "report.html").read_text()
    # the curves: a PNG beside the markdown, the same PNG inside the html
    assert "![dpo.png](plots/dpo.png)" in md
    png = (tmp_path / "plots" / "dpo.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [base64.b64decode(e) for e in embedded] == [png]
    assert "<img" in page and 'src="plots/' not in page  # self-contained
    # final metrics and data counts (read / kept / dropped by reason)
    assert "| train_loss | 0.61 |" in md
    assert "| train | 72 | 68 | 4 | 0 | longer than max_length: 3, identical chosen and rejected: 1 |" in md
    assert "longer than max_length: 3" in page
    # answers: a column per model, a row per prompt
    assert "| prompt | base | dpo |" in md
    for messages in prompts:
        assert messages[-1]["content"].replace("|", "\\|") in md
    cached = json.loads((tmp_path / "answers.json").read_text())
    assert set(cached) == {"base", "dpo"} and all(len(c["answers"]) == 6 for c in cached.values())

    # writing the report again reuses the answers: no model is loaded
    def no_engine(*args, **kwargs):
        raise AssertionError("answers were generated again")

    monkeypatch.setattr("medgpt.infer.engine.load_engine", no_engine)
    write_report(tmp_path, results, ModelRef(model, None, "chatml"), prompts, max_new_tokens=3)
    # ... unless a model changed (trained again)
    weights = tmp_path / "model" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="generated again"):
        write_report(tmp_path, results, ModelRef(model, None, "chatml"), prompts, max_new_tokens=3)


def test_report_without_curves_or_answers(tmp_path):
    (tmp_path / "rm").mkdir()
    report = write_report(tmp_path, [StageResult("rm", "rm", tmp_path / "rm")], None, load_prompts("none"))
    md = report.read_text()
    assert "No training curves logged" in md and "Answers side by side" not in md
    assert plot_curves([{"step": 1, "learning_rate": 1e-4}], "x") is None


def test_plot_panels_follow_the_logged_metrics():
    rows = [{"step": s, "loss": 1.0 / s, "kl": 0.01 * s, "reward": 0.1 * s, "reward_std": 1.0} for s in (1, 2, 3)]
    assert plot_curves(rows, "grpo").startswith(b"\x89PNG")


def test_bad_prompts_file_points_at_the_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"query": "ok"}\n{"query": \n')
    with pytest.raises(UserError, match=r"prompts.jsonl:2"):
        load_prompts(str(path))
    assert load_prompts("off") == []


# ---- a report a reader understands without the code --------------------------------------------

TRL = Path(trl.__file__).parent


def sft_log() -> list[dict]:
    """metrics.jsonl as medgpt's callback writes it for TRL 1.16's SFTTrainer (the names it logs, from a real
    4-step run): train rows, one eval row, then the end-of-training summary."""
    rows = [{"step": s, "epoch": s / 15, "time": 1.7e9 + s, "loss": 3.0 - 0.1 * s, "grad_norm": 0.7,
             "learning_rate": 2e-4 * s / 3, "entropy": 2.3, "num_tokens": 1569.0 * s,
             "mean_token_accuracy": 0.35 + 0.01 * s} for s in range(1, 5)]
    rows.append({"step": 4, "epoch": 0.27, "time": 1.7e9 + 5, "eval_loss": 2.7, "eval_runtime": 9.1,
                 "eval_samples_per_second": 1.4, "eval_steps_per_second": 0.2, "eval_entropy": 2.2,
                 "eval_num_tokens": 6276.0, "eval_mean_token_accuracy": 0.39})
    rows.append({"step": 4, "epoch": 0.27, "time": 1.7e9 + 6, "train_runtime": 600.0, "train_loss": 2.85,
                 "train_samples_per_second": 0.05, "train_steps_per_second": 0.007, "total_flos": 1.2e12})
    return rows


class HtmlTables(HTMLParser):
    """Every <table> of a page as [headers, *rows] of cell texts, and the classes of spans per cell."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.spans: list[str] = []
        self._cell: list[str] | None = None
        self._span = False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "span" and ("class", "cut") in attrs:
            self._span = True

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "span":
            self._span = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._span:
            self.spans.append(data)


class FakeEngine:
    """Answers every prompt at once; the second prompt's answer is cut at the token limit."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    template = tokenizer = None  # a template without a reasoning format

    def encode(self, messages):
        return [len(messages)]

    def run(self, requests):
        return self.generate(requests, requests[0].params)

    def generate(self, prompts, params):
        from medgpt.infer.base import Completion

        return [Completion(f"answer {i}", 10, params.max_new_tokens if i == 1 else 5, "length" if i == 1 else "stop")
                for i in range(len(prompts))]


def test_html_report_names_axes_settings_cut_answers_and_data(tmp_path, monkeypatch):
    from medgpt.config import read_yaml
    from medgpt.models import write_meta
    from medgpt.report.settings import SETTINGS_FILE, settled_settings
    from medgpt.train import load_config

    # stage 1: a fresh SFT run, its settings settled by medgpt's own config code (hyperparameters.json)
    cfg = load_config("examples/sft_smollm2.yaml", ["--max_steps", "4", "--output_dir", str(tmp_path / "sft")])
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_log()))
    (sft / SETTINGS_FILE).write_text(json.dumps(settled_settings(cfg)))
    stats = DataStats(read=132)
    stats.drop("longer than max_length", "medical_sft.jsonl:7")
    (sft / "data_stats.json").write_text(json.dumps({"train": stats.to_dict()}))
    (sft / "final_metrics.json").write_text(json.dumps({"train_loss": 2.85, "eval_mean_token_accuracy": 0.39}))
    # stage 2: an older DPO folder with only medgpt.json (as save_outputs writes it): defaults come from TRL
    dpo = tmp_path / "dpo"
    dpo.mkdir()
    raw = {"stage": "dpo", "method": "lora", "lora_rank": 8, "per_device_train_batch_size": 2, "max_length": 256}
    write_meta(dpo, stage="dpo", method="lora", base_model=cfg.model.model, adapter_base=None, template="chatml",
               complete=True, config=raw)
    (dpo / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.69, "rewards/margins": 0.01,
                                                   "rewards/accuracies": 0.5, "learning_rate": 1e-6}) + "\n")

    figures = []
    savefig = Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    monkeypatch.setattr("medgpt.infer.engine.load_engine", FakeEngine)
    prompts = load_prompts(None)
    results = [StageResult("sft", "sft", sft, ModelRef("m", str(sft))), StageResult("dpo", "dpo", dpo)]
    report = write_report(tmp_path, results, ModelRef("m"), prompts, max_new_tokens=16)

    # the plots: every visible panel has a title, an x label and a y label with its unit; curves by their meaning
    assert len(figures) == 2
    sft_axes = [ax for ax in figures[0].axes if ax.get_visible()]
    for ax in [*sft_axes, *(ax for ax in figures[1].axes if ax.get_visible())]:
        assert ax.get_title() and ax.get_xlabel() == "optimizer step" and ax.get_ylabel()
    by_title = {ax.get_title(): ax for ax in sft_axes}
    assert by_title["Loss"].get_ylabel() == "loss (nats/token)"
    accuracy = by_title["Next-token accuracy"]
    assert [t.get_text() for t in accuracy.get_legend().get_texts()] == ["token accuracy (train batch)",
                                                                         "token accuracy (eval)"]
    assert accuracy.get_ylabel() == "share of tokens predicted right (0–1)"
    logged = [[r["mean_token_accuracy"] for r in sft_log()[:4]], [sft_log()[4]["eval_mean_token_accuracy"]]]
    assert [line.get_ydata().tolist() for line in accuracy.get_lines()] == logged
    assert by_title["Learning-rate schedule"].get_ylabel() == "learning rate"
    legends = [t.get_text() for ax in sft_axes for t in ax.get_legend().get_texts()]
    assert not [name for name in legends if name in sft_log()[0] or name.startswith("eval_")]  # no raw log keys
    dpo_titles = {ax.get_title(): ax for ax in figures[1].axes if ax.get_visible()}
    assert dpo_titles["Loss"].get_ylabel() == "loss (nats/pair)"
    assert [t.get_text() for t in dpo_titles["Implicit rewards: chosen vs rejected"].get_legend().get_texts()] == \
        ["reward margin (chosen − rejected) (train batch)"]

    page = (tmp_path / "report.html").read_text()
    parsed = HtmlTables()
    parsed.feed(page)
    settings = [dict(t[1:]) for t in parsed.tables if t[0] == ["setting", "value"]]
    assert len(settings) == 2
    sft_settings, dpo_settings = settings
    # the reference: the settled Config and the shipped YAML
    shipped = read_yaml("examples/sft_smollm2.yaml")
    assert sft_settings["method"] == "LoRA"
    assert sft_settings["LoRA rank / alpha"].startswith(f"rank {shipped['lora_rank']}, alpha {shipped['lora_alpha']}")
    assert sft_settings["learning rate"].startswith(f"{shipped['learning_rate']:.4g}, cosine schedule")
    assert sft_settings["steps"] == "4 optimizer steps (max_steps); logged up to step 4"
    batch = shipped["per_device_train_batch_size"]
    assert sft_settings["batch"] == (f"{batch} per device × 1 gradient accumulation × 1 process = "
                                     f"{batch} conversations per optimizer step")
    assert sft_settings["max length"] == f"{shipped['max_length']} tokens (longer records: drop)"
    assert sft_settings["precision"] == ("bf16 mixed precision" if cfg.train.bf16 else "fp32")
    # LoRA trains fp32 adapters on a frozen base held in the compute dtype (fp32 on a CPU)
    weights = sft_settings["weights dtype (training)"]
    assert weights in (f"LoRA adapters fp32, frozen base {d}" for d in ("fp32", "bf16", "fp16")), weights
    assert sft_settings["device"] == "CPU" or sft_settings["device"].startswith("CUDA GPU (")
    # the old folder: what medgpt.json recorded, TRL's own defaults for the rest, the device unknown
    trl_dpo = trl.DPOConfig(output_dir=str(tmp_path / "x"), use_cpu=True)
    assert dpo_settings["LoRA rank / alpha"].startswith("rank 8, alpha 16")
    assert dpo_settings["learning rate"].startswith(f"{trl_dpo.learning_rate:.4g}")
    assert dpo_settings["dpo options"].startswith(f"beta {trl_dpo.beta:.4g}")
    assert dpo_settings["max length"] == "256 tokens (longer records: drop)"
    assert dpo_settings["steps"] == f"{trl_dpo.num_train_epochs:g} epochs (num_train_epochs); logged up to step 1"
    assert dpo_settings["model"] == f"{cfg.model.model} (template chatml)"
    assert dpo_settings["precision"] == dpo_settings["device"] == "not recorded"
    # the data counts beside the stage
    data = [t for t in parsed.tables if t[0][:3] == ["data", "read", "kept"]]
    assert data == [[["data", "read", "kept", "dropped", "truncated", "dropped by reason"],
                     ["train", "132", "131", "1", "0", "longer than max_length: 1"]]]
    # answers cut at the token limit are marked, in the page and in the markdown; kept in the cache
    answers = next(t for t in parsed.tables if t[0] == ["prompt", "base", "sft"])
    assert [row[1].endswith("cut at 16 tokens") for row in answers[1:]] == [i == 1 for i in range(len(prompts))]
    assert parsed.spans == ["cut at 16 tokens"] * 2
    md = report.read_text()
    assert md.count("**[cut at 16 tokens]**") == 2 and "| answer 1<br>**[cut at 16 tokens]** |" in md
    cached = json.loads((tmp_path / "answers.json").read_text())
    assert cached["base"]["answers"][1] == {"text": "answer 1", "finish_reason": "length", "completion_tokens": 16,
                                            "reasoning": None, "unanswered": False}
    # written again from the cache: the marks stay
    monkeypatch.setattr("medgpt.infer.engine.load_engine", None)
    write_report(tmp_path, results, ModelRef("m"), prompts, max_new_tokens=16)
    assert (tmp_path / "report.html").read_text().count('<span class="cut">cut at 16 tokens</span>') == 2


def test_every_metric_the_report_names_is_one_the_trainers_log():
    """The reference: the sources of TRL's trainers, transformers' Trainer and medgpt's PPO (a renamed metric
    in a new TRL would silently drop a curve)."""
    import transformers

    from medgpt.report.labels import METRICS, metric_label

    sources = [*(TRL / "trainer").glob("*_trainer.py"), TRL / "experimental" / "orpo" / "orpo_trainer.py",
               Path(transformers.__file__).parent / "trainer.py", Path(ppo.__file__)]
    text = "\n".join(p.read_text() for p in sources)
    for name in METRICS:
        assert re.search(r'["}]' + re.escape(name) + '"', text), name
    assert metric_label("mean_token_accuracy") == ("token_accuracy", "token accuracy (train batch)")
    assert metric_label("eval_rewards/margins") == ("implicit_reward", "reward margin (chosen − rejected) (eval)")
    assert metric_label("rewards/medical_terms/mean") == ("reward", "reward: medical_terms (train batch)")
    assert metric_label("learning_rate") == ("learning_rate", "learning rate")
    assert metric_label("eval_runtime") is None and metric_label("train_loss") is None


def test_a_training_report_in_the_adapter_folder_reuses_its_answers(tmp_path, monkeypatch):
    """`medgpt train` writes the report into the folder of the adapter that answers: writing the report must not
    make that adapter look changed."""
    folder = tmp_path / "sft"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    monkeypatch.setattr("medgpt.infer.engine.load_engine", FakeEngine)
    results = [StageResult("sft", "sft", folder, ModelRef("m", str(folder)))]
    write_report(folder, results, ModelRef("m"), load_prompts(None), max_new_tokens=16)
    monkeypatch.setattr("medgpt.infer.engine.load_engine", None)  # a second generation would fail
    write_report(folder, results, ModelRef("m"), load_prompts(None), max_new_tokens=16)
    assert "cut at 16 tokens" in (folder / "report.md").read_text()


def test_answers_are_generated_again_where_the_model_would_answer_in_another_precision(tmp_path, monkeypatch):
    """The same model answers differently in bf16 and in fp32: cached answers are keyed by the precision too."""
    import medgpt.models
    from medgpt.report.answers import generate_answers

    loads = []

    class CountingEngine(FakeEngine):
        def __init__(self, *args, **kwargs):
            loads.append(args)

        def close(self):
            pass

    monkeypatch.setenv("MEDGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("medgpt.infer.engine.load_engine", CountingEngine)
    refs, prompts = {"base": ModelRef(str(tmp_path / "no-files"), None, "chatml")}, load_prompts(None)[:2]
    monkeypatch.setattr(medgpt.models, "inference_precision", lambda dtype="auto": "fp32")
    first = generate_answers(refs, prompts, tmp_path / "answers.json", max_new_tokens=4)
    assert generate_answers(refs, prompts, tmp_path / "answers.json", max_new_tokens=4) == first
    assert len(loads) == 1  # read back
    monkeypatch.setattr(medgpt.models, "inference_precision", lambda dtype="auto": "bf16")
    generate_answers(refs, prompts, tmp_path / "answers.json", max_new_tokens=4)
    assert len(loads) == 2  # another precision: generated again


def test_answers_section_says_how_much_each_model_reasoned():
    from medgpt.report.answers import Answer
    from medgpt.report.document import answers_section

    prompts = [[{"role": "user", "content": "Fever?"}], [{"role": "user", "content": "Cough?"}]]
    answers = {"base": [Answer("Rest.", "stop", 3), Answer("Fluids.", "stop", 3)],
               "sft": [Answer("Rest.", "stop", 9, "Low-grade fever."), Answer("", "length", 16, "A cough that", True)]}
    _, [(_, note), (_, headers, rows)] = answers_section(prompts, answers)
    assert "sft: 2 of 2 answers reasoned first (mean 14 characters of reasoning, 1 cut inside it)" in note
    assert "base:" not in note and rows[1][2].unanswered
