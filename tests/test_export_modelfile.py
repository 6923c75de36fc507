"""The Ollama Modelfile: its TEMPLATE, rendered by Go's own text/template the way Ollama renders it, gives the text
medgpt's template renders.

The reference renderer is a small Go program (below) using Go's standard text/template, fed what Ollama's
template.Execute feeds a template that uses `.Messages`: the Modelfile's SYSTEM prepended as a system message when
the conversation has none (server/routes.go), then Ollama's `collate` (the system messages' text joined by blank
lines as `.System`; consecutive messages of one role merged). Without a `go` binary (Debian: apt-get install
golang-go) the rendering tests skip and say so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from types import SimpleNamespace

import pytest

from medgpt.data.templates import TEMPLATES, get_template
from medgpt.errors import UserError
from medgpt.export.modelfile import go_template, modelfile, named_template, ollama_sampling
from medgpt.infer.base import chat_defaults

RENDER_GO = r'''
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	var out []string
	for _, c := range cases {
		msgs := c.Messages
		if (len(msgs) == 0 || msgs[0].Role != "system") && c.System != "" {
			msgs = append([]Message{{Role: "system", Content: c.System}}, msgs...)
		}
		var system []string
		var collated []*Message
		for i := range msgs {
			m := msgs[i]
			if m.Role == "system" {
				system = append(system, m.Content)
			}
			if len(collated) > 0 && collated[len(collated)-1].Role == m.Role {
				collated[len(collated)-1].Content += "\n\n" + m.Content
			} else {
				collated = append(collated, &m)
			}
		}
		tmpl := template.Must(template.New("").Parse(c.Template))
		var b strings.Builder
		err := tmpl.Execute(&b, map[string]any{"System": strings.Join(system, "\n\n"), "Messages": collated,
			"Tools": nil, "Response": ""})
		if err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
'''

CONVERSATION = [{"role": "user", "content": "我头痛，血压150/95。"}, {"role": "assistant", "content": "多久了？"},
                {"role": "user", "content": "两周。What should I do?"}]


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    go = shutil.which("go")
    if go is None:
        print("SKIP reason: no `go` binary (Debian: apt-get install golang-go); the TEMPLATE is rendered with Go's "
              "own text/template")
        pytest.skip("Go is not installed: the Modelfile TEMPLATE is rendered with Go's text/template")
    folder = tmp_path_factory.mktemp("ollama-render")
    (folder / "render.go").write_text(RENDER_GO)
    binary = folder / "render"
    env = {"GOCACHE": str(folder / "cache"), "HOME": str(folder), "PATH": "/usr/bin:/bin",
           "GO111MODULE": "off"}
    subprocess.run([go, "build", "-o", str(binary), str(folder / "render.go")], check=True, env=env, cwd=folder)

    def render(cases: list[dict]) -> list[str]:
        done = subprocess.run([str(binary)], input=json.dumps(cases), capture_output=True, text=True, check=True)
        return json.loads(done.stdout)
    return render


def cases_for(template, system_prompts):
    return [{"template": go_template(template), "system": template.default_system or "",
             "messages": ([{"role": "system", "content": s}] if s else []) + CONVERSATION} for s in system_prompts]


def test_every_template_renders_in_go_as_in_medgpt(go_render):
    """System + multi-turn + generation prompt, and the same without a system prompt (the template's default,
    which the Modelfile's SYSTEM gives): Go's rendering equals Template.render for every named template."""
    cases, expected = [], []
    for template in TEMPLATES.values():
        systems = [None] if template.no_system else ["你是医生。Answer briefly.", None]
        cases += cases_for(template, systems)
        expected += [template.render(CONVERSATION, add_generation_prompt=True, system=s) for s in systems]
    rendered = go_render(cases)
    for template_case, got, want in zip(cases, rendered, expected):
        assert got == want, (template_case["messages"], got, want)


def test_auto_template_of_the_bundled_model_is_chatml_with_its_default_system(go_render, tokenizer):
    """SmolLM2's own Jinja template is ChatML with its default system prompt: the Modelfile renders it in Go as the
    tokenizer's Jinja (transformers' apply_chat_template) does."""
    auto = get_template("auto", tokenizer)
    chat = named_template(auto)
    assert chat.name == "chatml" and chat.default_system == auto.default_system
    rendered = go_render(cases_for(chat, ["Be brief.", None]))
    with_system = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *CONVERSATION],
                                                tokenize=False, add_generation_prompt=True)
    without = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert rendered == [with_system, without]


def test_modelfile_has_from_template_system_stops_and_chat_sampling():
    template = TEMPLATES["qwen"]
    sampling = ollama_sampling(chat_defaults(SimpleNamespace(model_sampling={"temperature": 0.3})))
    text = modelfile("m-f16.gguf", template, [*template.stop_words, "<|im_end|>"], sampling)
    lines = text.splitlines()
    assert lines[0] == "FROM ./m-f16.gguf"
    assert lines[1].startswith('TEMPLATE """{{') and lines[1].endswith('}}"""')
    assert f'SYSTEM """{template.default_system}"""' in lines
    assert [line for line in lines if line.startswith("PARAMETER stop")] == [
        'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"']
    # the model's generation config sets the temperature; the rest are medgpt chat's defaults
    for line in ("PARAMETER temperature 0.3", "PARAMETER top_p 0.9", "PARAMETER top_k 0",
                 "PARAMETER repeat_penalty 1.1", "PARAMETER repeat_last_n -1"):
        assert line in lines


def test_a_template_without_a_named_equivalent_is_refused():
    odd = SimpleNamespace(name="auto", default_system=None,
                          render=lambda messages, add_generation_prompt=False: "<odd>" + str(len(messages)))
    with pytest.raises(UserError, match="matches none of medgpt's templates"):
        named_template(odd)
    with pytest.raises(UserError, match="not --template none"):
        named_template(None)
