"""The Ollama Modelfile of an exported GGUF: FROM the file, a TEMPLATE (a Go text/template) that renders what the
medgpt template renders, the default system prompt, the stop strings and medgpt chat's sampling defaults.

Ollama renders a TEMPLATE with `.Messages` (the conversation, each with `.Role` and `.Content`, the system messages
included) and `.System` (the system messages' text; the Modelfile's SYSTEM where the request has none). The TEMPLATE
written here skips the system messages in the loop and writes `.System` where the medgpt template puts the system
prompt (its own block, or folded into the first or last user turn); it ends with the generation prompt unless the
conversation ends with an assistant message, which it leaves open for the model to continue (Ollama's convention).
Every literal is a Go string constant inside an action, so no text of the template is ever trimmed.

Differences: a format without a system prompt (Gemma-2) ignores one (medgpt refuses it); Go templates cannot
trim strings, so a template that trims contents (`strip`: Llama-3, Llama-2,
Mistral, Gemma) writes them as given (the same text wherever contents carry no surrounding whitespace); tools, tool
calls and tool results are not written (templates with a tool format still render plain conversations exactly).
"""

from __future__ import annotations

import json
from typing import Any

from medgpt.errors import UserError


def go_string(text: str) -> str:
    """`text` as a Go string constant (JSON's escapes are Go's; non-ASCII characters written as they are)."""
    return json.dumps(text, ensure_ascii=False)


def _out(*pieces: str) -> str:
    """Actions writing Go constants (`"..."`) and fields (`.Content`) in order; empty constants left out."""
    return "".join("{{ " + p + " }}" for p in pieces if p and p != '""')


def _format(fmt: str, expr: str) -> str:
    """A medgpt format string (`{content}` where the message goes) as actions writing it with `expr` as content."""
    before, found, after = fmt.partition("{content}")
    return _out(go_string(before), expr if found else "", go_string(after))


def go_template(template: Any) -> str:
    """The Go text/template of a medgpt Template (see the module docstring for what it renders)."""
    if template is None or template.name == "auto":
        raise UserError("the Modelfile's TEMPLATE is written from a medgpt template; name one with --template "
                        "(`medgpt template list`), not 'auto'")
    fold = template.fold_system
    parts = ['{{- $first := -1 }}{{- $last := -1 }}{{- $turn := 0 }}{{- $role := "" }}',
             '{{- range $i, $m := .Messages }}{{- if eq $m.Role "user" }}{{- if lt $first 0 }}{{- $first = $i }}'
             '{{- end }}{{- $last = $i }}{{- end }}{{- end }}',
             _out(go_string(template.prefix))]
    if not fold and not template.no_system:
        block = _format(template.system, "$.System")
        parts.append(block if template.system_always else "{{- if $.System }}" + block + "{{- end }}")
    user_fmt = template.user
    user_before, _, user_after = user_fmt.partition("{content}")
    user = _out(go_string(user_before))
    if fold:
        at = "$first" if fold == "first" else "$last"
        user += "{{- if and $.System (eq $i " + at + ") }}" + _format(template.system, "$.System") + "{{- end }}"
    user += _out(".Content", go_string(user_after))
    if template.first_user is not None:
        user = "{{- if eq $turn 0 }}" + _format(template.first_user, ".Content") + "{{- else }}" + user + "{{- end }}"
    reply_before, _, reply_after = template.assistant.partition("{content}")
    assistant = (_out(go_string(template.assistant_start), go_string(reply_before), ".Content")
                 + "{{- if lt (len (slice $.Messages $i)) 2 }}{{- else }}"
                 + _out(go_string(reply_after), go_string(template.assistant_sep)) + "{{- end }}")
    parts += ["{{- range $i, $m := .Messages }}{{- if ne .Role \"system\" }}",
              "{{- if eq .Role \"user\" }}" + user,
              "{{- else if eq .Role \"assistant\" }}" + assistant,
              "{{- end }}{{- $turn = 1 }}{{- $role = .Role }}{{- end }}{{- end }}",
              "{{- if ne $role \"assistant\" }}" + _out(go_string(template.assistant_start)) + "{{- end }}"]
    return "".join(parts)


def modelfile(gguf_name: str, template: Any, stops: list[str], sampling: dict[str, Any]) -> str:
    """The Modelfile text: FROM ./gguf_name, TEMPLATE, SYSTEM (the template's default), stops and sampling."""
    text = go_template(template)
    if '"""' in text:
        raise UserError(f"template {template.name!r}: its Go template holds three quotes, which a Modelfile cannot")
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{text}"""']
    if template.default_system:
        if '"""' in template.default_system:
            raise UserError("the default system prompt holds three quotes, which a Modelfile cannot")
        lines.append(f'SYSTEM """{template.default_system}"""')
    lines += [f"PARAMETER stop {go_string(stop)}" for stop in dict.fromkeys(stops)]
    lines += [f"PARAMETER {name} {value:g}" if isinstance(value, float) else f"PARAMETER {name} {value}"
              for name, value in sampling.items()]
    return "\n".join(lines) + "\n"


def ollama_sampling(params: Any) -> dict[str, Any]:
    """medgpt chat's GenerationParams as Ollama parameters; repeat_last_n -1 makes llama.cpp's repetition penalty
    cover the whole context, as transformers' (which medgpt uses) does."""
    return {"temperature": float(params.temperature), "top_p": float(params.top_p), "top_k": int(params.top_k),
            "repeat_penalty": float(params.repetition_penalty), "repeat_last_n": -1}


# conversations on which a named template must render what the tokenizer's own (`auto`) does to stand in for it
_PROBES = (
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2"}],
)


def named_template(template: Any) -> Any:
    """`template` itself when it is a named medgpt template; for `auto` (the tokenizer's own Jinja) the named
    template, with auto's default system prompt, that renders the same text on every probe conversation (with and
    without a system prompt, one and several turns, with and without the generation prompt); else a UserError."""
    import dataclasses

    from medgpt.data.templates import TEMPLATES

    if template is None:
        raise UserError("the Modelfile needs a chat template (not --template none)")
    if template.name != "auto":
        return template
    for candidate in TEMPLATES.values():
        candidate = dataclasses.replace(candidate, default_system=template.default_system)
        try:
            if all(candidate.render(c, add_generation_prompt=g) == template.render(c, add_generation_prompt=g)
                   for c in _PROBES for g in (True, False)):
                return candidate
        except UserError:
            continue
    raise UserError("the tokenizer's own chat template matches none of medgpt's templates, so the Modelfile's "
                    "TEMPLATE cannot be written from it; name one with --template (`medgpt template list`)")
