"""Knowledge-base documents: read .txt/.md/.pdf/.docx into text, and cut the text into overlapping chunks.

Chunks end at sentence boundaries that work for Chinese (。！？；) and English (. ! ? before a space), and
at line breaks, so a chunk never stops mid-sentence unless one sentence alone is longer than a chunk.
Sizes are counted in approximate tokens (one per CJK character, one per word of other scripts), so a
Chinese and an English chunk of the same size carry about the same amount of text for the model.
Every chunk is a verbatim slice of the document, so a citation can point at its exact place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

EXTENSIONS = (".txt", ".md", ".pdf", ".docx")
TEXT_ENCODINGS = ("utf-8-sig", "gb18030")  # UTF-8 first; GB18030 covers the older Chinese files (GBK, GB2312)

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_UNIT = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")
_BOUNDARY = re.compile(r"[。！？；…]+[”’」』）)\"']*|[.!?]+[\"')\]”’]*(?=\s)|\n")


class DocumentError(ValueError):
    """A file that cannot be indexed; the message says why (it is counted, not fatal, in a folder)."""


@dataclass
class Document:
    name: str  # path relative to the indexed folder: what citations show
    text: str
    page_starts: list[int] | None = None  # character offset of each PDF page

    def location(self, offset: int) -> str:
        """`page N` for PDFs, `line N` for everything else."""
        if self.page_starts:
            return f"page {sum(1 for start in self.page_starts if start <= offset)}"
        return f"line {self.text.count(chr(10), 0, offset) + 1}"

    def title(self) -> str:
        """The first line if it reads as a title (a markdown heading or a short line), else the file name."""
        first = next((line.strip() for line in self.text.splitlines() if line.strip()), "")
        first = first.lstrip("#").strip()
        return first if 0 < len(first) <= 80 else Path(self.name).stem


@dataclass
class Chunk:
    file: str
    index: int  # position within its file, from 0
    location: str  # line or page where it starts
    text: str


def read_document(path: Path, name: str) -> Document:
    """Read one file into text; raises DocumentError with the reason when it cannot be used."""
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise DocumentError(f"unsupported file type {suffix or '(none)'} (expected {', '.join(EXTENSIONS)})")
    if suffix == ".pdf":
        doc = _read_pdf(path, name)
    elif suffix == ".docx":
        doc = Document(name, _read_docx(path))
    else:
        doc = Document(name, _read_text(path))
    if not doc.text.strip():
        raise DocumentError("no text" + (" (a scanned PDF without a text layer?)" if suffix == ".pdf" else ""))
    return doc


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    for encoding in TEXT_ENCODINGS:
        try:
            return data.decode(encoding).replace("\r\n", "\n")
        except UnicodeDecodeError:
            continue
    raise DocumentError(f"not text in {' or '.join(TEXT_ENCODINGS)}")


def _read_pdf(path: Path, name: str) -> Document:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            raise DocumentError("the PDF is encrypted")
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PdfReadError, OSError, ValueError, KeyError) as exc:
        raise DocumentError(f"unreadable PDF ({type(exc).__name__}: {exc})") from exc
    text, starts = "", []
    for page in pages:
        starts.append(len(text))
        text += page.strip() + "\n\n"
    return Document(name, text, starts)


def _read_docx(path: Path) -> str:
    import zipfile

    import docx

    try:
        document = docx.Document(str(path))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise DocumentError(f"unreadable .docx ({type(exc).__name__}: {exc})") from exc
    lines = [p.text for p in document.paragraphs]
    for table in document.tables:
        lines += [" | ".join(cell.text.strip() for cell in row.cells) for row in table.rows]
    return "\n".join(lines)


def approx_tokens(text: str) -> int:
    """About the number of model tokens: one per CJK character, one per word of other scripts."""
    return len(_UNIT.findall(text))


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence or line, whitespace trimmed; blank pieces dropped."""
    spans, start = [], 0
    for match in [*_BOUNDARY.finditer(text), None]:
        end = match.end() if match else len(text)
        piece = text[start:end]
        stripped = piece.strip()
        if stripped:
            left = start + len(piece) - len(piece.lstrip())
            spans.append((left, left + len(stripped)))
        start = end
    return spans


def _cut_long(text: str, span: tuple[int, int], size: int) -> list[tuple[int, int]]:
    """A sentence longer than `size` tokens cut into pieces of about `size` tokens."""
    start, end = span
    units = approx_tokens(text[start:end])
    if units <= size:
        return [span]
    step = max(1, (end - start) * size // units)
    return [(s, min(s + step, end)) for s in range(start, end, step)]


def split_chunks(doc: Document, size: int = 160, overlap: int = 32) -> list[Chunk]:
    """Greedy chunks of whole sentences up to `size` tokens; each starts with up to `overlap` tokens
    of the previous one, so a fact that straddles two chunks is whole in at least one of them."""
    if size < 1 or not 0 <= overlap < size:
        raise ValueError("chunk size must be >= 1 and 0 <= overlap < size")
    spans = [piece for span in sentence_spans(doc.text) for piece in _cut_long(doc.text, span, size)]
    units = [approx_tokens(doc.text[s:e]) for s, e in spans]
    chunks: list[Chunk] = []
    i = 0
    while i < len(spans):
        j, total = i, 0
        while j < len(spans) and (j == i or total + units[j] <= size):
            total += units[j]
            j += 1
        while j - 1 > i and j < len(spans) and doc.text.startswith("#", spans[j - 1][0]):
            j -= 1  # a markdown heading opens the next chunk instead of closing this one
        start, end = spans[i][0], spans[j - 1][1]
        chunks.append(Chunk(doc.name, len(chunks), doc.location(start), doc.text[start:end]))
        if j == len(spans):
            break
        k, carried = j, 0
        while k - 1 > i and carried + units[k - 1] <= overlap:
            k -= 1
            carried += units[k]
        i = k
    return chunks
