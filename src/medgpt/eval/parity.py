"""Parity: does a fine-tune compute the same thing in every form a user runs it?

The reference is the merged model in fp32 (the base model itself when there is no adapter), run with transformers.
Each candidate runs the same token ids: the adapter on its base (PEFT, unmerged), medgpt's engine (the continuous
batching scheduler the server uses), the exported GGUF through transformers' GGUF loader (which de-quantizes to
fp32) and through llama.cpp (llama-cpp-python, where installed), and vLLM (where installed, on a GPU).

On each prompt (rendered with the model's template) the reference generates a greedy continuation; prompt +
continuation is then scored teacher-forced by every runtime. Per pair:
- max |Δ log-prob|: the largest difference of the log-prob of the actual next token, over every position;
- top-1 agreement: the share of positions whose most likely next token is the same;
- greedy agreement: the share of prompts whose greedy continuations (MAX_NEW_TOKENS tokens, up to and including a
  stop token) are the same token for token.

Verdict: a pair passes when max |Δ log-prob| is within the tolerance of the candidate's weight precision
(TOLERANCES), and every top-1 disagreement and every greedy divergence happens at a near-tie of the reference: a
position whose two most likely tokens are within 2x the tolerance of each other, where a difference within the
tolerance can flip the order. (A divergence elsewhere means the candidate computes something else.) The shares of
agreement are reported as measured.

The tolerances: fp32 runtimes hold the same weights and differ only in the order of floating-point operations
(x·W + x·A·B against x·(W + A·B); a batch padded on the left against one row), relative errors of ~1e-6, so 1e-3
bounds their log-prob differences with a wide margin. f16 rounds every weight to 11 significant bits (relative error
up to 2^-11), bf16 to 8 bits (2^-8); q8_0 stores blocks of 32 weights as 8-bit integers with one f16 scale (error
up to half a step, 1/254 of the block's largest weight); llama.cpp also rounds the activations a matrix meets to
f16 or to q8 blocks. The f16 and q8_0 tolerances are about twice the largest differences measured on the bundled
SmolLM2-135M-Instruct and a LoRA trained on it (llama.cpp: 0.045 and 0.56; transformers' GGUF loader: 0.016 and
0.38; docs/inference.md has the tables); bf16's (not measured there) is f16's 0.045 scaled by bf16's 8x coarser
rounding, doubled.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from medgpt.errors import UserError

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 32
PARITY_FILE = "parity.json"


@dataclass(frozen=True)
class Tolerance:
    logprob: float  # max |Δ log-prob| of the actual next token; near-ties are within twice this


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(1e-3),
    "f16": Tolerance(0.1),
    "bf16": Tolerance(0.75),
    "q8_0": Tolerance(1.0),
}


@dataclass
class Outputs:
    """What one runtime computed: per row the log-prob of each actual next token and the most likely token at each
    position (positions 1..n-1), per prompt the greedy continuation."""

    logprobs: list[list[float]]
    top1: list[list[int]]
    greedy: list[list[int]]
    margins: list[list[float]] | None = None  # the reference's: top-1 minus top-2 log-prob at each position


@dataclass
class PairResult:
    pair: str
    reference: str
    candidate: str
    precision: str
    tolerance: dict
    max_logprob_delta: float | None = None
    top1_agreement: float | None = None
    greedy_agreement: float | None = None
    positions: int = 0
    prompts: int = 0
    passed: bool | None = None  # None: skipped
    skipped: str | None = None
    first_divergence: dict | None = None
    failures: list[str] = field(default_factory=list)


@dataclass
class Candidate:
    """A runtime to compare with the reference: `run(rows, prompts, stop_ids)` gives its Outputs, or `skip` says why
    it cannot run here."""

    name: str
    precision: str
    run: Callable[[list[list[int]], list[list[int]], set[int]], Outputs] | None = None
    skip: str | None = None


# -- runtimes ------------------------------------------------------------------------------------------------------


def cut_at_stop(ids: list[int], stop_ids: set[int], limit: int) -> list[int]:
    """The first `limit` ids, up to and including the first stop id."""
    out = []
    for token in ids[:limit]:
        out.append(int(token))
        if token in stop_ids:
            break
    return out


def torch_outputs(model: Any, rows: list[list[int]], prompts: list[list[int]], stop_ids: set[int],
                  max_new_tokens: int = MAX_NEW_TOKENS) -> Outputs:
    """Outputs of a transformers model, one row per forward (no padding)."""
    import torch

    logprobs, top1, greedy, margins = [], [], [], []
    with torch.inference_mode():
        for row in rows:
            scores = torch.log_softmax(model(torch.tensor([row])).logits[0, :-1].float(), dim=-1)
            logprobs.append(scores.gather(1, torch.tensor(row[1:])[:, None])[:, 0].tolist())
            best = scores.topk(2, dim=-1)
            top1.append(best.indices[:, 0].tolist())
            margins.append((best.values[:, 0] - best.values[:, 1]).tolist())
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=sorted(stop_ids) or None, pad_token_id=0,
                                 temperature=None, top_p=None, top_k=None)
            greedy.append(cut_at_stop(out[0, len(prompt):].tolist(), stop_ids, max_new_tokens))
    return Outputs(logprobs, top1, greedy, margins)


def engine_outputs(engine: Any, rows: list[list[int]], prompts: list[list[int]], stop_ids: set[int],
                   max_new_tokens: int = MAX_NEW_TOKENS) -> Outputs:
    """Outputs of a medgpt engine: prompt log-probs (echo) of each row, greedy requests submitted together (so they
    share the running batch, as a server's requests do)."""
    from medgpt.infer.base import GenerationParams, Request

    scored = engine.run([Request(row, GenerationParams(max_new_tokens=0, logprobs=1), echo=True) for row in rows])
    logprobs = [[p.logprob for p in c.prompt_logprobs[1:]] for c in scored]
    top1 = [[p.top[0][0] for p in c.prompt_logprobs[1:]] for c in scored]
    made = engine.run([Request(p, GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)) for p in prompts])
    return Outputs(logprobs, top1, [cut_at_stop(c.token_ids, stop_ids, max_new_tokens) for c in made])


def llama_cpp_outputs(path: str | Path, rows: list[list[int]], prompts: list[list[int]], stop_ids: set[int],
                      max_new_tokens: int = MAX_NEW_TOKENS) -> Outputs:
    """Outputs of llama.cpp (llama-cpp-python) on the GGUF file: logits of every position, greedy by argmax."""
    import numpy as np
    from llama_cpp import Llama

    n_ctx = max(len(r) for r in [*rows, *prompts]) + max_new_tokens + 8
    llm = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_gpu_layers=0, seed=0)
    logprobs, top1, greedy = [], [], []
    for row in rows:
        llm.reset()
        llm.eval(row)
        logits = np.asarray(llm.scores[:len(row) - 1], dtype=np.float64)
        scores = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        logprobs.append([float(scores[i, t]) for i, t in enumerate(row[1:])])
        top1.append(scores.argmax(-1).tolist())
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt)
        made: list[int] = []
        while len(made) < max_new_tokens:
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            made.append(token)
            if token in stop_ids:
                break
            llm.eval([token])
        greedy.append(made)
    del llm
    return Outputs(logprobs, top1, greedy)


# -- comparison ----------------------------------------------------------------------------------------------------


def compare(reference: Outputs, candidate: Outputs, tolerance: Tolerance, prompt_lengths: list[int],
            stop_ids: set[int]) -> dict:
    """The pair's numbers, verdict and first unexplained divergence (prompt index, position) against `tolerance`;
    `reference.margins` says where the reference is at a near-tie, `prompt_lengths` where each continuation starts
    in its row. A continuation that is the other's beginning without ending in a stop id was cut short (an engine
    returns whole characters, so a token limit inside a character drops its last byte tokens) and agrees."""
    tie = 2 * tolerance.logprob
    margins = reference.margins or [[math.inf] * len(lp) for lp in reference.logprobs]
    worst, agree, positions, flips, first = 0.0, 0, 0, 0, None
    for p, row in enumerate(zip(reference.logprobs, candidate.logprobs, reference.top1, candidate.top1, margins)):
        for i, (a, b, x, y, margin) in enumerate(zip(*row)):
            delta = abs(a - b) if math.isfinite(a) and math.isfinite(b) else math.inf
            worst = max(worst, delta)
            agree += x == y
            positions += 1
            unexplained = x != y and margin > tie
            flips += unexplained
            if first is None and (delta > tolerance.logprob or unexplained):
                first = {"kind": "teacher-forced", "prompt": p, "position": i + 1, "logprob_delta": delta,
                         "reference_top1": x, "candidate_top1": y, "reference_margin": margin}
    same = diverged = 0
    for p, (a, b) in enumerate(zip(reference.greedy, candidate.greedy)):
        short, long = sorted((a, b), key=len)
        if a == b or (long[:len(short)] == short and not (set(short[-1:]) & stop_ids)):
            same += 1  # equal, or one cut short of the token limit (the engine returns whole characters only)
            continue
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        where = prompt_lengths[p] + at - 1  # the row position whose next-token prediction differs
        margin = margins[p][where] if at < len(a) and where < len(margins[p]) else math.inf
        if margin > tie:
            diverged += 1
            if first is None:
                first = {"kind": "greedy", "prompt": p, "position": at, "reference_margin": margin,
                         "reference_token": a[at] if at < len(a) else None,
                         "candidate_token": b[at] if at < len(b) else None}
    top1 = agree / positions if positions else 1.0
    greedy = same / len(reference.greedy) if reference.greedy else 1.0
    failures = [f"max |Δ log-prob| {worst:.3g} > {tolerance.logprob:g}"] if worst > tolerance.logprob else []
    failures += [f"{flips} top-1 disagreement(s) away from a near-tie"] if flips else []
    failures += [f"{diverged} greedy divergence(s) away from a near-tie"] if diverged else []
    return {"max_logprob_delta": worst, "top1_agreement": top1, "greedy_agreement": greedy, "positions": positions,
            "prompts": len(reference.greedy), "passed": not failures, "failures": failures, "first_divergence": first}


def free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# -- the check -----------------------------------------------------------------------------------------------------


def run_parity(model: str | None = None, adapter: str | None = None, prompts: str | None = None,
               quants: tuple[str, ...] = ("f16", "q8_0"), gguf_files: tuple[str, ...] = (),
               template: str | None = None, max_new_tokens: int = MAX_NEW_TOKENS, limit: int | None = None,
               runtimes: tuple[str, ...] | None = None, trust_remote_code: bool = False,
               work_dir: str | None = None) -> dict:
    """Run the reference and every candidate on the prompts; the result (JSON-ready) has one entry per pair.

    `quants`: GGUF precisions exported (to a temporary folder, or `work_dir`) and compared; `gguf_files`: existing
    GGUF files compared as well (their precision read from the file). `runtimes`: the candidate kinds to run (adapter,
    engine, gguf, llama.cpp, vllm; default all that apply)."""
    import torch

    from medgpt.export.gguf import check_quant, export_model
    from medgpt.infer.base import stop_tokens
    from medgpt.models import open_model
    from medgpt.report.answers import load_prompts

    kinds = set(runtimes or ("adapter", "engine", "gguf", "llama.cpp", "vllm"))
    unknown = kinds - {"adapter", "engine", "gguf", "llama.cpp", "vllm"}
    if unknown:
        raise UserError(f"runtimes {', '.join(sorted(unknown))}: expected adapter, engine, gguf, llama.cpp, vllm")
    quants = tuple(check_quant(q) for q in quants)
    for q in quants:
        if q not in TOLERANCES:
            raise UserError(f"parity of {q}: no stated tolerance (those with one: {', '.join(TOLERANCES)})")
    for path in gguf_files:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such GGUF file")
    conversations = load_prompts(prompts)[:limit]
    if not conversations:
        raise UserError("parity needs at least one prompt")
    opened = open_model(model, adapter, template, dtype="fp32", trust_remote_code=trust_remote_code)
    if opened.template is None:
        raise UserError("parity renders prompts with a chat template (not --template none)")
    tokenizer = opened.tokenizer
    stop_ids, _ = stop_tokens(tokenizer, opened.template, opened.model)
    prompt_ids = [list(opened.template.encode_prompt(tokenizer, messages)) for messages in conversations]
    peft_model = opened.model if opened.adapter else None
    merged = peft_model.merge_and_unload() if peft_model is not None else opened.model
    reference_name = "merged (transformers, fp32)" if opened.adapter else "model (transformers, fp32)"
    # the reference's own continuations make the teacher-forced rows: every runtime scores the same ids
    greedy = torch_outputs(merged, [], prompt_ids, stop_ids, max_new_tokens).greedy
    rows = [p + g for p, g in zip(prompt_ids, greedy)]
    reference = torch_outputs(merged, rows, [], stop_ids, max_new_tokens)
    reference.greedy = greedy
    del merged, peft_model
    opened.model = None
    free_memory()

    model_arg, adapter_arg = opened.folder, opened.adapter
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="medgpt-parity-"))
    candidates: list[Candidate] = []
    if opened.adapter and "adapter" in kinds:
        def peft_run(rows, prompts, stops):
            again = open_model(model_arg, adapter_arg, template, dtype="fp32", trust_remote_code=trust_remote_code)
            return torch_outputs(again.model, rows, prompts, stops, max_new_tokens)
        candidates.append(Candidate("adapter on base (PEFT, unmerged, fp32)", "fp32", peft_run))
    if "engine" in kinds:
        def engine_run(rows, prompts, stops):
            from medgpt.infer.engine import TransformersEngine

            with TransformersEngine(model_arg, adapter_arg, template, dtype="fp32", device="cpu") as engine:
                return engine_outputs(engine, rows, prompts, stops, max_new_tokens)
        served = "adapter unmerged" if opened.adapter else "model"
        candidates.append(Candidate(f"medgpt engine ({served}, fp32)", "fp32", engine_run))
    files: list[tuple[Path, str]] = [(Path(p), gguf_precision(p)) for p in gguf_files]
    if "gguf" in kinds or "llama.cpp" in kinds:
        for q in quants:
            done = export_model(model_arg, work / f"gguf-{q}", adapter=adapter_arg, quant=q, template=template,
                                trust_remote_code=trust_remote_code)
            files.append((done.gguf, q))
    for path, precision in files:
        if "gguf" in kinds:
            def gguf_run(rows, prompts, stops, path=path):
                from transformers import AutoModelForCausalLM

                loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
                return torch_outputs(loaded, rows, prompts, stops, max_new_tokens)
            candidates.append(Candidate(f"GGUF {precision} (transformers GGUF loader)", precision, gguf_run))
        if "llama.cpp" in kinds:
            skip = None if importlib.util.find_spec("llama_cpp") else \
                "llama-cpp-python is not installed (pip install 'medgpt[export]')"
            candidates.append(Candidate(f"GGUF {precision} (llama.cpp)", precision,
                                        None if skip else (lambda rows, prompts, stops, path=path:
                                                           llama_cpp_outputs(path, rows, prompts, stops,
                                                                             max_new_tokens)), skip))
    if "vllm" in kinds:
        skip = "vLLM is not installed" if importlib.util.find_spec("vllm") is None else \
            None if torch.cuda.is_available() else "vLLM needs a GPU and none is visible"

        def vllm_run(rows, prompts, stops):
            from medgpt.infer.engine import load_engine

            with load_engine(model_arg, adapter_arg, template, engine="vllm", dtype="fp32") as engine:
                return engine_outputs(engine, rows, prompts, stops, max_new_tokens)
        served = "adapter unmerged" if opened.adapter else "model"
        candidates.append(Candidate(f"vLLM ({served}, fp32)", "fp32", None if skip else vllm_run, skip))

    pairs = []
    for candidate in candidates:
        tolerance = TOLERANCES.get(candidate.precision)
        result = PairResult(f"{reference_name} vs {candidate.name}", reference_name, candidate.name,
                            candidate.precision, asdict(tolerance) if tolerance else {})
        if tolerance is None:
            result.skipped = f"no stated tolerance for {candidate.precision}"
        elif candidate.skip or candidate.run is None:
            result.skipped = candidate.skip
        else:
            log.info("parity: %s", candidate.name)
            numbers = compare(reference, candidate.run(rows, prompt_ids, stop_ids), tolerance,
                              [len(p) for p in prompt_ids], stop_ids)
            for key, value in numbers.items():
                setattr(result, key, value)
            free_memory()
        if result.first_divergence:
            p = result.first_divergence["prompt"]
            result.first_divergence["prompt_text"] = conversations[p][-1]["content"][:200]
        pairs.append(asdict(result))
    return {"model": opened.folder, "adapter": opened.adapter, "template": opened.template.name,
            "prompts": len(conversations), "max_new_tokens": max_new_tokens, "tolerances":
            {k: asdict(v) for k, v in TOLERANCES.items()}, "pairs": pairs,
            "passed": all(p["passed"] is not False for p in pairs)}


def gguf_precision(path: str | Path) -> str:
    """The precision of a GGUF file's weights as TOLERANCES names it (by its general.file_type)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field_ = reader.fields.get("general.file_type")
    if field_ is None:
        raise UserError(f"{path}: no general.file_type in the GGUF metadata")
    names = {gguf.LlamaFileType.ALL_F32: "fp32", gguf.LlamaFileType.MOSTLY_F16: "f16",
             gguf.LlamaFileType.MOSTLY_BF16: "bf16", gguf.LlamaFileType.MOSTLY_Q8_0: "q8_0"}
    value = gguf.LlamaFileType(int(field_.contents()))
    return names.get(value, value.name.lower().removeprefix("mostly_"))


def format_table(result: dict) -> str:
    """The pairs as a Markdown table (the report's parity table)."""
    from medgpt.report.document import PARITY_HEADERS, parity_rows

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(PARITY_HEADERS), "|" + "---|" * len(PARITY_HEADERS),
                      *(line(row) for row in parity_rows(result))])


def divergences(result: dict) -> list[str]:
    """For each failing pair: where it first diverged (prompt, position), in words."""
    out = []
    for p in result["pairs"]:
        d = p.get("first_divergence")
        if p["passed"] is False and d:
            where = f"prompt {d['prompt']} ({d.get('prompt_text', '')!r}), {d['kind']} position {d['position']}"
            out.append(f"{p['candidate']}: first diverges at {where}")
    return out
