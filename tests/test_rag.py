"""Knowledge-base QA: chunking, indexing (incremental), hybrid retrieval, citations, and the commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medgpt.cli import main
from medgpt.errors import UserError
from medgpt.rag.documents import Document, approx_tokens, read_document, split_chunks
from medgpt.rag.index import build_index, load_index
from medgpt.rag.retrieve import _rrf, augment, cited, open_retriever


@pytest.fixture(scope="module")
def kb_index(sample_data, tmp_path_factory) -> Path:
    """The sample knowledge base indexed with the default embedder."""
    out = tmp_path_factory.mktemp("kb") / "index"
    build_index([sample_data / "kb"], out)
    return out


@pytest.fixture(scope="module")
def questions(sample_data) -> list[dict]:
    return json.loads((sample_data / "kb" / "QUESTIONS.json").read_text(encoding="utf-8"))


def test_chunks_end_at_sentences_overlap_and_are_verbatim():
    text = ("# 标题\n\n" + "".join(f"这是第{i}句话，内容关于高血压的管理。" for i in range(30)) + "\n\n"
            + " ".join(f"Sentence number {i} is about blood pressure." for i in range(30)))
    doc = Document("mixed.md", text)
    chunks = split_chunks(doc, size=60, overlap=15)
    assert len(chunks) > 4
    for chunk, following in zip(chunks, chunks[1:]):
        assert chunk.text in text  # a verbatim slice, so citations point at real text
        assert chunk.text.endswith(("。", ".")), chunk.text[-20:]
        assert approx_tokens(chunk.text) <= 60
        tail = chunk.text[-8:]
        assert tail in following.text, "the next chunk repeats the end of this one"
    assert chunks[0].location == "line 1"
    assert chunks[-1].location == "line 5"


def test_a_sentence_longer_than_a_chunk_is_cut():
    doc = Document("long.txt", "没有标点" * 200)
    chunks = split_chunks(doc, size=100, overlap=0)
    assert len(chunks) == 8
    assert "".join(c.text for c in chunks) == doc.text


def test_right_document_is_retrieved_for_every_sample_question(kb_index, questions):
    retriever = open_retriever(kb_index)
    for q in questions:
        sources = retriever.search(q["question"], k=4)
        assert sources[0].file == q["file"], q["question"]
        assert any(q["answer_contains"] in s.text for s in sources if s.file == q["file"]), q["question"]


@pytest.mark.parametrize("mode", ["dense", "bm25"])
def test_each_retriever_alone_finds_most_documents(kb_index, questions, mode):
    retriever = open_retriever(kb_index)
    hits = sum(retriever.search(q["question"], k=1, mode=mode)[0].file == q["file"] for q in questions)
    assert hits >= len(questions) - 2


def test_reciprocal_rank_fusion_rewards_agreement():
    dense = np.array([1, 2, 3])  # ranks: item 0 first by embeddings
    bm25 = np.array([0, 3, 1])  # item 0 not found by BM25, item 2 first
    fused = _rrf(dense, bm25)
    assert fused.argmax() == 2  # third by one ranking, first by the other beats first by one alone
    assert fused[1] > fused[0]


def test_augment_puts_numbered_sources_in_the_last_turn(kb_index, questions):
    q = questions[0]
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    messages, sources = augment([*history, {"role": "user", "content": q["question"]}], kb_index, k=3)
    assert messages[:2] == history
    prompt = messages[-1]["content"]
    assert prompt.endswith(q["question"])
    assert f"[1] {q['file']}, chunk {sources[0]['chunk']}" in prompt
    assert [s["n"] for s in sources] == [1, 2, 3]
    assert sources[0]["file"] == q["file"] and sources[0]["text"] in prompt


def test_citations_are_parsed():
    assert cited("Take it daily [2]. Check INR [1, 3] and 【2】 again [9].", 3) == [2, 1, 3]
    assert cited("no citation", 3) == []


def test_changed_file_is_reindexed_and_unchanged_files_are_not(sample_data, tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(sample_data / "kb", docs)
    out = tmp_path / "index"
    first = build_index([docs], out, embedder="tfidf")
    assert len(first.added) == 6 and first.embedded == first.chunks
    before = load_index(out)

    stamp = (out / "meta.json").stat().st_mtime_ns
    again = build_index([docs], out, embedder="tfidf")
    assert again.embedded == 0 and len(again.unchanged) == 6
    assert (out / "meta.json").stat().st_mtime_ns == stamp, "an up-to-date index is not rewritten"

    with (docs / "warfarin_interactions.md").open("a", encoding="utf-8") as f:
        f.write("\nPatients should carry a warfarin alert card listing their zorbolex clinic number.\n")
    (docs / "influenza_vaccination.md").unlink()
    (docs / "new_note.txt").write_text("Zinc lozenges are not recommended for infants.", encoding="utf-8")
    report = build_index([docs], out, embedder="tfidf")
    assert report.changed == ["warfarin_interactions.md"]
    assert report.added == ["new_note.txt"]
    assert report.removed == ["influenza_vaccination.md"]
    assert len(report.unchanged) == 4
    after = load_index(out)
    warfarin = [c for c in after.chunks if c.file == "warfarin_interactions.md"]
    assert report.embedded == len(warfarin) + 1
    for name in report.unchanged:  # the vectors of unchanged files are carried over as they were
        old = [i for i, c in enumerate(before.chunks) if c.file == name]
        new = [i for i, c in enumerate(after.chunks) if c.file == name]
        np.testing.assert_array_equal(before.embeddings[old], after.embeddings[new])
    top = open_retriever(out).search("zorbolex clinic number card", k=1)[0]
    assert top.file == "warfarin_interactions.md" and "zorbolex" in top.text
    assert not list(tmp_path.glob(".index.*")), "no temporary folder is left behind"


def _pdf(pages: list[str]) -> bytes:
    """A minimal PDF with one line of Helvetica text per page."""
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
    objects = ["<< /Type /Catalog /Pages 2 0 R >>",
               f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>",
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, text in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET"
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {5 + 2 * i} 0 R "
                       "/Resources << /Font << /F1 3 0 R >> >> >>")
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def test_pdf_and_docx_are_read_and_broken_files_are_skipped(tmp_path):
    import docx

    (tmp_path / "leaflet.pdf").write_bytes(_pdf(["Aspirin reduces fever.", "Metformin lowers blood glucose."]))
    document = docx.Document()
    document.add_paragraph("Statins lower LDL cholesterol.")
    document.save(str(tmp_path / "lipids.docx"))
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a pdf")
    (tmp_path / "notes.csv").write_text("ignored,file\n")

    pdf = split_chunks(read_document(tmp_path / "leaflet.pdf", "leaflet.pdf"), size=4, overlap=0)
    assert [(c.text, c.location) for c in pdf] == [("Aspirin reduces fever.", "page 1"),
                                                  ("Metformin lowers blood glucose.", "page 2")]
    report = build_index([tmp_path], tmp_path / "index", embedder="tfidf")
    assert sorted(report.added) == ["leaflet.pdf", "lipids.docx"]
    assert list(report.skipped) == ["broken.pdf"]
    top = open_retriever(tmp_path / "index").search("statins cholesterol", k=1)[0]
    assert top.file == "lipids.docx"


def test_bad_input_is_a_clear_error(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported file type"):
        build_index([tmp_path / "data.csv"], tmp_path / "index")
    with pytest.raises(UserError, match="no such file"):
        build_index([tmp_path / "missing"], tmp_path / "index")
    with pytest.raises(UserError, match="not a knowledge-base index"):
        open_retriever(tmp_path)
    (tmp_path / "doc.txt").write_text("Some text.")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("user data")
    with pytest.raises(UserError, match="not a medgpt index"):
        build_index([tmp_path / "doc.txt"], tmp_path / "taken", embedder="tfidf")
    assert (tmp_path / "taken" / "keep.txt").exists()


def test_rag_commands(sample_data, tmp_path, tiny_model, capsys):
    index = tmp_path / "index"
    assert main(["rag", "index", str(sample_data / "kb"), "--out", str(index), "--embedder", "tfidf"]) == 0
    assert "added" in capsys.readouterr().out
    assert main(["rag", "search", str(index), "手足口病的潜伏期一般是多长时间？", "-k", "2", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["sources"][0]["file"] == "hand_foot_mouth_disease.txt"
    assert main(["rag", "ask", str(index), "What is the INR target for a mechanical mitral valve?",
                 "--model", tiny_model, "--max-new-tokens", "4", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert isinstance(answer["answer"], str)
    assert answer["sources"][0]["file"] == "warfarin_interactions.md"
    assert main(["rag", "ask", str(tmp_path), "question?"]) == 2
    assert "not a knowledge-base index" in capsys.readouterr().err


def test_chat_and_server_answer_with_sources(kb_index, tiny_model):
    import httpx

    from medgpt.cli import build_parser
    from medgpt.infer.chat import ChatSession
    from medgpt.infer.base import GenerationParams
    from medgpt.infer.engine import load_engine
    from medgpt.infer.server import ServerSettings, create_app, running_server
    from medgpt.rag import kb_from_args

    for command in ("chat", "serve", "webui"):
        args = build_parser(command).parse_args([command, "--kb", str(kb_index), "--kb-top-k", "2"])
        assert (args.kb, args.kb_top_k, args.kb_mode) == (str(kb_index), 2, "hybrid")
    hook = kb_from_args(args)
    engine = load_engine(tiny_model, dtype="fp32")
    params = GenerationParams(max_new_tokens=4)

    session = ChatSession(engine, params, augment=hook)
    "".join(session.reply("鼻喷流感减毒活疫苗适用于哪个年龄段？"))
    assert [s["file"] for s in session.sources][:1] == ["influenza_vaccination.md"]
    assert session.history[0]["content"] == "鼻喷流感减毒活疫苗适用于哪个年龄段？"  # history keeps the plain question

    app = create_app(engine, ServerSettings(defaults=params), augment=hook)
    with running_server(app) as url:
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "any", "messages": [{"role": "user", "content": "How often should an inhaler spacer be washed?"}]})
    assert reply.status_code == 200
    sources = reply.json()["sources"]
    assert len(sources) == 2 and sources[0]["file"] == "asthma_inhaler_use.txt"
    assert sources[0]["source"].startswith("asthma_inhaler_use.txt, chunk ")
