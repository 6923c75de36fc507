"""Knowledge-base QA: chunking, indexing (incremental), hybrid retrieval, citations, and the commands.

Retrieval is measured on the shipped knowledge base with the default embedder: kb/QUESTIONS.json names,
for each question, the one file whose text holds `answer_contains` (checked here against the documents).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _inference import closes_its_engines

from medgpt.cli import main
from medgpt.errors import UserError
from medgpt.rag import DEFAULT_MODE, MODES
from medgpt.rag.documents import Document, approx_tokens, read_document, split_chunks
from medgpt.rag.index import BM25_TOKENIZER, bm25_tokens, build_index, load_index
from medgpt.rag.retrieve import (NO_SOURCES, augment, build_prompt, cited, open_retriever, rank_chunks,
                                 reciprocal_rank_fusion)


@pytest.fixture(scope="module")
def kb_index(sample_data, tmp_path_factory) -> Path:
    """The sample knowledge base indexed with the default embedder."""
    out = tmp_path_factory.mktemp("kb") / "index"
    build_index([sample_data / "kb"], out)
    return out


@pytest.fixture(scope="module")
def all_questions(sample_data) -> list[dict]:
    return json.loads((sample_data / "kb" / "QUESTIONS.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def questions(all_questions) -> list[dict]:
    """The questions the knowledge base answers."""
    return [q for q in all_questions if q["file"]]


def recall(retriever, questions: list[dict], mode: str, k: int) -> float:
    return float(np.mean([q["file"] in [s.file for s in retriever.search(q["question"], k=k, mode=mode)]
                          for q in questions]))


def test_question_set_covers_both_languages_and_names_the_file_holding_each_answer(sample_data, all_questions):
    texts = {p.name: p.read_text(encoding="utf-8") for p in (sample_data / "kb").iterdir() if p.suffix != ".json"}
    answerable = [q for q in all_questions if q["file"]]
    assert len(answerable) >= 20
    for q in answerable:
        assert [name for name, text in texts.items() if q["answer_contains"] in text] == [q["file"]], q
    pairs = {(q["lang"], q["doc_lang"]) for q in answerable}
    assert pairs == {("en", "en"), ("zh", "zh"), ("en", "zh"), ("zh", "en")}
    assert {q["lang"] for q in all_questions if not q["file"]} == {"en", "zh"}


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


def test_right_document_and_answer_are_retrieved_for_every_sample_question(kb_index, questions):
    retriever = open_retriever(kb_index)
    for q in questions:
        sources = retriever.search(q["question"], k=4)
        assert q["file"] in [s.file for s in sources[:3]], q["question"]
        assert any(q["answer_contains"] in s.text for s in sources if s.file == q["file"]), q["question"]


def test_default_mode_recalls_at_least_as_well_as_each_single_retriever(kb_index, questions):
    retriever = open_retriever(kb_index)
    table = {(mode, k): recall(retriever, questions, mode, k) for mode in MODES for k in (1, 3)}
    for k in (1, 3):
        for mode in MODES:
            assert table[DEFAULT_MODE, k] >= table[mode, k], table
    assert table[DEFAULT_MODE, 3] == 1.0, table


def test_cross_language_questions_are_found_and_bm25_cannot_push_out_the_dense_match(kb_index, questions):
    retriever = open_retriever(kb_index)
    cross = [q for q in questions if q["lang"] != q["doc_lang"]]
    assert {(q["lang"], q["doc_lang"]) for q in cross} == {("en", "zh"), ("zh", "en")}
    for q in cross:
        hybrid = retriever.search(q["question"], k=3)
        assert q["file"] in [s.file for s in hybrid], q["question"]
        if not retriever.search(q["question"], k=3, mode="bm25"):  # BM25 has no real match in the other language
            dense = retriever.search(q["question"], k=3, mode="dense")
            assert [(s.file, s.chunk) for s in hybrid] == [(s.file, s.chunk) for s in dense], q["question"]
    assert recall(retriever, cross, DEFAULT_MODE, 1) >= 0.8


@pytest.mark.parametrize("mode", ["dense", "bm25"])
def test_each_retriever_alone_finds_same_language_documents(kb_index, questions, mode):
    retriever = open_retriever(kb_index)
    same = [q for q in questions if q["lang"] == q["doc_lang"]]
    assert recall(retriever, same, mode, 1) >= (len(same) - 1) / len(same)


def test_reciprocal_rank_fusion_rewards_agreement():
    dense = np.array([1, 2, 3])  # ranks: item 0 first by embeddings
    bm25 = np.array([0, 3, 1])  # item 0 not found by BM25, item 2 first
    fused = reciprocal_rank_fusion(dense, bm25)
    assert fused.argmax() == 2  # third by one ranking, first by the other beats first by one alone
    assert fused[1] > fused[0]


def test_relevance_floors_decide_which_retriever_votes():
    dense = np.array([0.50, 0.20, 0.18, 0.05])
    bm25 = np.array([0.0, 3.0, 2.0, 1.0])
    weak = np.array([0.0, 0.2, 0.1, 0.3])  # BM25 shares a word or two with the question: no real match
    order, _ = rank_chunks(dense, bm25, weak, "hybrid", dense_floor=0.15, bm25_floor=0.4)
    assert order == [0, 1, 2], "the dense match stays first; chunk 3 is relevant to neither retriever"
    strong = np.array([0.0, 0.9, 0.1, 0.3])  # chunk 1 holds most of the question's words
    order, _ = rank_chunks(dense, bm25, strong, "hybrid", dense_floor=0.15, bm25_floor=0.4)
    assert order[0] == 1, "agreement of both retrievers wins"
    order, _ = rank_chunks(dense, bm25, np.array([0.0, 0.0, 0.0, 0.8]), "hybrid", dense_floor=0.6, bm25_floor=0.4)
    assert order == [3], "an exact-term match counts even where the embedding misses it"
    assert rank_chunks(dense, bm25, weak, "dense", dense_floor=0.6)[0] == []
    assert rank_chunks(dense, bm25, weak, "bm25", bm25_floor=0.4)[0] == []
    assert rank_chunks(dense, bm25, weak, "dense", dense_floor=None)[0] == [0, 1, 2, 3]


def test_bm25_tokens_segment_chinese_and_split_english_words():
    import jieba

    # reference: jieba's own search-mode segmentation of the Chinese run
    assert set(jieba.lcut_for_search("流感疫苗")) <= set(bm25_tokens("接种流感疫苗"))
    tokens = bm25_tokens("手足口病的潜伏期一般是多长时间？")
    assert "潜伏期" in tokens and "潜伏" in tokens
    assert not {"的", "一般", "多长时间", "？"} & set(tokens), "stop words, question words and punctuation go"
    assert bm25_tokens("What is the Target INR for Warfarin?") == ["target", "inr", "warfarin"]
    assert bm25_tokens("ＩＮＲ ２.５") == ["inr", "2.5"], "full-width letters and digits become ASCII"
    assert bm25_tokens("sodium 2,300 mg, St John’s wort") == ["sodium", "2300", "mg", "st", "john", "wort"]
    assert bm25_tokens("华法林INR目标") == [*bm25_tokens("华法林"), "inr", *bm25_tokens("目标")]


def test_bm25_alone_finds_chinese_questions_in_chinese_documents(kb_index, questions):
    retriever = open_retriever(kb_index)
    zh = [q for q in questions if q["lang"] == q["doc_lang"] == "zh"]
    for q in zh:
        top = retriever.search(q["question"], k=1, mode="bm25")
        assert top and top[0].file == q["file"], q["question"]


def test_off_topic_question_gets_no_sources_and_the_model_is_told(kb_index, all_questions):
    off_topic = [q for q in all_questions if not q["file"]]
    retriever = open_retriever(kb_index)
    for q in off_topic:
        for mode in MODES:
            assert retriever.search(q["question"], k=4, mode=mode) == [], (q["question"], mode)
        messages, sources = augment([{"role": "user", "content": q["question"]}], kb_index)
        assert sources == []
        assert messages[-1]["content"] == NO_SOURCES[q["lang"]].format(question=q["question"])
    prompt = build_prompt("How do I reset my router password?", [])
    assert "no passage" in prompt and "[1]" not in prompt


def test_augment_puts_numbered_sources_in_the_last_turn(kb_index, questions):
    q = questions[0]
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    messages, sources = augment([*history, {"role": "user", "content": q["question"]}], kb_index, k=3)
    assert messages[:2] == history
    prompt = messages[-1]["content"]
    assert f"Question: {q['question']}\n" in prompt and "[1]" in prompt.split("Sources:")[0]
    assert [s["n"] for s in sources] == [1, 2, 3]
    for s in sources:  # the numbers in the prompt are the numbers of the sources returned
        assert f"[{s['n']}] {s['file']}, chunk {s['chunk']}\n{s['text']}" in prompt
    assert sources[0]["file"] == q["file"]


def test_the_prompt_asks_for_citations_in_the_language_of_the_question(kb_index, questions):
    en_to_zh = next(q for q in questions if (q["lang"], q["doc_lang"]) == ("en", "zh"))
    messages, sources = augment([{"role": "user", "content": en_to_zh["question"]}], kb_index, k=2)
    prompt = messages[-1]["content"]
    assert sources and "Answer in English" in prompt and "cite" in prompt
    zh_to_en = next(q for q in questions if (q["lang"], q["doc_lang"]) == ("zh", "en"))
    messages, sources = augment([{"role": "user", "content": zh_to_en["question"]}], kb_index, k=2)
    assert sources and "请用中文" in messages[-1]["content"] and "[1]" in messages[-1]["content"]


def test_citations_are_parsed():
    assert cited("Take it daily [2]. Check INR [1, 3] and 【2】 again [9].", 3) == [2, 1, 3]
    assert cited("See [2-3] and [资料1]; also [Source 4].", 4) == [2, 3, 1, 4]
    assert cited("Stage 1 is [130-139] mmHg.", 4) == []
    assert cited("no citation", 3) == []


def test_an_index_from_the_older_tokenizer_gets_its_bm25_rebuilt(sample_data, tmp_path, caplog):
    out = tmp_path / "index"
    build_index([sample_data / "kb"], out, embedder="tfidf")
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    del meta["bm25_tokenizer"]
    (out / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    shutil.rmtree(out / "bm25")  # in its place, a BM25 built from other chunks: a stale one must not be used
    build_index([sample_data / "kb" / "asthma_inhaler_use.txt"], tmp_path / "other", embedder="tfidf")
    shutil.copytree(tmp_path / "other" / "bm25", out / "bm25")
    with caplog.at_level("WARNING"):
        kb = load_index(out)
    assert "older tokenizer" in caplog.text
    assert kb.bm25.scores["num_docs"] == len(kb.chunks)
    report = build_index([sample_data / "kb"], out, embedder="tfidf")
    assert report.embedded == 0, "the vectors are reused"
    assert json.loads((out / "meta.json").read_text(encoding="utf-8"))["bm25_tokenizer"] == BM25_TOKENIZER


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
    with closes_its_engines():
        assert main(["rag", "ask", str(index), "What is the INR target for a mechanical mitral valve?",
                     "--model", tiny_model, "--max-new-tokens", "4", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert isinstance(answer["answer"], str)
    assert answer["sources"][0]["file"] == "warfarin_interactions.md"
    # a floor nothing reaches: the user is told, not shown an empty list
    assert main(["rag", "search", str(index), "如何学习弹吉他？", "--min-score", "0.99", "--mode", "dense"]) == 0
    assert "No passage in the knowledge base is relevant" in capsys.readouterr().out
    assert main(["rag", "ask", str(tmp_path), "question?"]) == 2
    assert "not a knowledge-base index" in capsys.readouterr().err


ASK_RUNS = 1  # each run is a new interpreter (seconds); test_infer_engine.py has the deterministic case


def test_rag_ask_exits_cleanly_run_after_run(sample_data, tmp_path, tiny_model):
    """`medgpt rag ask` streams its answer and exits 0, run after run, never aborting at exit ("terminate called
    without an active exception", exit 134: the engine's thread in a torch op while the interpreter tears down)."""
    import subprocess
    import sys

    index = tmp_path / "index"
    build_index([sample_data / "kb"], index, embedder="tfidf")
    command = [sys.executable, "-c", "import sys; from medgpt.cli import main; sys.exit(main(sys.argv[1:]))",
               "rag", "ask", str(index), "How should warfarin be taken?", "--model", tiny_model,
               "--max-new-tokens", "32"]
    for run in range(ASK_RUNS):
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "terminate called" not in done.stderr, (run, done.stderr[-2000:])
        assert "Sources" in done.stdout


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
        assert (args.kb, args.kb_top_k, args.kb_mode, args.kb_min_score) == (str(kb_index), 2, "hybrid", None)
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
