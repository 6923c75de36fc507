"""Answer perplexity: how likely the model finds the reference answers, given their prompts.

Each item is a conversation (SFT data) or a `{"question", "answer"}` row (one user turn, one reply).
It goes through the chat template as training does (`Template.encode`), and only the assistant tokens
(with their end-of-turn marker: the tokens SFT learns) are scored. An item's NLL is its mean negative
log-likelihood per scored token (nats); the overall NLL is the summed NLL over all scored tokens, and
perplexity is exp(NLL). Unlike accuracy on four letters, this moves with every step of training, also
on a model that is at chance on multiple choice.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from medgpt.errors import UserError

log = logging.getLogger(__name__)


def read_conversations(data: str, limit: int | None = None) -> list[tuple[str, list[dict]]]:
    """(location, messages) per item: `{"question", "answer"}` rows, or any SFT format the data layer reads."""
    from medgpt.data.readers import read_records
    from medgpt.eval.gen import read_rows

    if _is_qa(Path(data).expanduser()):
        rows = read_rows(data, ("question", "answer"))[:limit]
        return [(r["_loc"], [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}])
                for r in rows]
    records, _ = read_records(data, "sft", max_samples=limit)
    return [(r["_loc"], r["messages"]) for r in records]


def _is_qa(path: Path) -> bool:
    """Whether a jsonl file's first row is a `{"question", "answer"}` object."""
    if not path.is_file() or path.suffix.lower() != ".jsonl":
        return False
    with path.open(encoding="utf-8") as handle:
        line = next((line for line in handle if line.strip()), "")
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and {"question", "answer"} <= row.keys()


def answer_nll(model, tokenizer, template, conversations: list[list[dict]], batch_size: int = 8,
               max_length: int = 2048, progress: bool = False) -> list[tuple[float, int]]:
    """(summed NLL in nats, scored tokens) of the assistant tokens of each conversation; batched, right-padded."""
    import torch
    from tqdm.auto import tqdm

    encoded = []
    for messages in conversations:
        row = template.encode(tokenizer, messages)
        ids, labels = row["input_ids"][:max_length], row["labels"][:max_length]
        if all(label < 0 for label in labels[1:]):
            raise UserError(f"no assistant tokens to score within {max_length} tokens: {messages[0]['content'][:60]!r}")
        encoded.append((ids, labels))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in tqdm(range(0, len(order), batch_size), desc="ppl", unit="batch", disable=not progress):
        chunk = order[start:start + batch_size]
        width = max(len(encoded[i][0]) for i in chunk)
        ids = torch.tensor([encoded[i][0] + [pad] * (width - len(encoded[i][0])) for i in chunk], device=device)
        mask = torch.tensor([[1] * len(encoded[i][0]) + [0] * (width - len(encoded[i][0])) for i in chunk],
                            device=device)
        labels = torch.tensor([encoded[i][1] + [-100] * (width - len(encoded[i][1])) for i in chunk], device=device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
        scored = target >= 0
        for row, i in enumerate(chunk):
            out[i] = (float(nll[row][scored[row]].sum()), int(scored[row].sum()))
    return out


def summarize(locs: list[str], scores: list[tuple[float, int]]) -> dict:
    """Per item and overall NLL (nats per token) and perplexity."""
    items = [{"id": str(i), "loc": loc, "nll": s / n, "ppl": math.exp(s / n), "nll_sum": s, "tokens": n}
             for i, (loc, (s, n)) in enumerate(zip(locs, scores))]
    total, tokens = sum(s for s, _ in scores), sum(n for _, n in scores)
    nll = total / max(tokens, 1)
    return {"metrics": {"nll": nll, "ppl": math.exp(nll)}, "n": len(items), "tokens": tokens, "items": items}


def run_ppl(model: str | None, data: str, adapter: str | None = None, template: str | None = None,
            batch_size: int = 8, max_length: int = 2048, limit: int | None = None, dtype: str = "auto",
            trust_remote_code: bool = False) -> dict:
    """`medgpt eval ppl`: the answer perplexity of `model` on `data`."""
    from medgpt.models import open_model

    conversations = read_conversations(data, limit)
    if template == "none":
        raise UserError("eval ppl scores the assistant turns of a chat template; --template none has none")
    opened = open_model(model, adapter, template, dtype=dtype, trust_remote_code=trust_remote_code)
    if opened.template is None:
        raise UserError(f"{opened.name}: no chat template; pass --template NAME")
    scores = answer_nll(opened.model, opened.tokenizer, opened.template, [m for _, m in conversations], batch_size,
                        max_length, progress=True)
    result = summarize([loc for loc, _ in conversations], scores)
    return {"task": "ppl", "model": model, "adapter": adapter, "data": data, "template": opened.template.name,
            **result}
