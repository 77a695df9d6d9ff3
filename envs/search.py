"""BM25 search over a small local document collection (the `search` tool), pure Python.

Documents are a JSONL file of {"id", "title", "text"} objects; `DOCS_PATH` is a small
collection about a fictional country (Kestria), so that answering its questions needs the
tool rather than what a pretrained model happens to remember.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from envs.gsm8k import read_jsonl

DOCS_PATH = Path(__file__).parent / "data" / "search_docs.jsonl"
WORD_RE = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the this to was were what when where "
    "which who whom why how with did does do".split()
)


def tokenize(text: str) -> list[str]:
    return [w for w in WORD_RE.findall(text.lower()) if w not in STOPWORDS]


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str


def load_documents(path: str | Path = DOCS_PATH) -> list[Document]:
    rows = read_jsonl(path, ("id", "title", "text"))
    ids = Counter(row["id"] for row in rows)
    duplicated = [i for i, n in ids.items() if n > 1]
    if duplicated:
        raise ValueError(f"{path}: duplicate document ids {duplicated}")
    return [Document(row["id"], row["title"], row["text"]) for row in rows]


class BM25Index:
    """Okapi BM25: score(d, q) = sum over query terms t of
    idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl)),
    with idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5)) (always positive).
    Titles are indexed with the text."""

    def __init__(self, documents: list[Document], k1: float = 1.5, b: float = 0.75):
        if not documents:
            raise ValueError("BM25Index needs at least one document")
        self.documents = list(documents)
        self.k1, self.b = k1, b
        self.term_counts = [Counter(tokenize(f"{d.title} {d.text}")) for d in self.documents]
        self.lengths = [sum(c.values()) for c in self.term_counts]
        self.avg_length = sum(self.lengths) / len(self.lengths)
        df = Counter(term for counts in self.term_counts for term in counts)
        n = len(self.documents)
        self.idf = {term: math.log(1 + (n - f + 0.5) / (f + 0.5)) for term, f in df.items()}

    @classmethod
    def from_file(cls, path: str | Path = DOCS_PATH, **kwargs) -> BM25Index:
        return cls(load_documents(path), **kwargs)

    def score(self, query_terms: list[str], i: int) -> float:
        counts, norm = self.term_counts[i], self.k1 * (1 - self.b + self.b * self.lengths[i] / self.avg_length)
        total = 0.0
        for term in query_terms:
            tf = counts.get(term, 0)
            if tf:
                total += self.idf[term] * tf * (self.k1 + 1) / (tf + norm)
        return total

    def search(self, query: str, k: int = 3) -> list[tuple[Document, float]]:
        """The k best documents with a positive score, best first (ties by file order)."""
        terms = tokenize(query)
        scored = [(self.score(terms, i), i) for i in range(len(self.documents))]
        best = sorted((pair for pair in scored if pair[0] > 0), key=lambda pair: (-pair[0], pair[1]))[:k]
        return [(self.documents[i], s) for s, i in best]

    def render(self, query: str, k: int = 3) -> str:
        """The search results as the model sees them."""
        hits = self.search(query, k)
        if not hits:
            return f"No documents match {query!r}."
        return "\n".join(f"[{n}] {d.title}: {d.text}" for n, (d, _) in enumerate(hits, 1))
