"""The `corpus` stage: plain text in, clean deduplicated chunks out, for continual pre-training.

A corpus is a folder of `.txt` / `.md` files or a JSONL file with one text per line. Text
is cleaned (control and zero-width characters, Markdown markup, wrapped lines), split into
paragraphs, deduplicated across the whole corpus (by a whitespace- and case-insensitive key),
and packed into chunks of at most `chunk_chars` characters that end at paragraph or sentence
boundaries. The output is `chunks.jsonl` (a `corpus` task reads it through `prepare`) and a
manifest with counts, drops and hashes.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pandera.pandas as pa

from fin_tasks.artifacts import (atomic_dir, package_versions, sha256_file, sha256_tree,
                                 write_json, write_jsonl)
from fin_tasks.config import CorpusConfig
from fin_tasks.errors import DataError
from fin_tasks.readers import RawRow, read_file, read_text
from fin_tasks.tasks import has_numeric

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
_INVISIBLE = re.compile(r"[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f\u200b-\u200f\ufeff]")
_MARKUP = [(re.compile(r"^[ \t]{0,3}#{1,6}[ \t]*", re.M), ""),        # headings
           (re.compile(r"^[ \t]*(?:[-*+]|\d+[.)])[ \t]+", re.M), ""),  # list bullets
           (re.compile(r"!?\[([^\]]*)\]\([^)]*\)"), r"\1"),      # links and images
           (re.compile(r"(\*\*|__|`+)"), "")]                   # emphasis, code ticks
_SENTENCE_END = re.compile(r"(?<=[。！？；!?;])|(?<=[.])\s+|\n")
# CJK ideographs, CJK punctuation and full-width forms: no space between them
_CJK = re.compile(r"[\u3000-\u303f\u3400-\u9fff\uf900-\ufaff\uff00-\uffef]")


@dataclass(frozen=True)
class Document:
    """One text of the corpus and where it came from."""

    source: str
    line: int | None
    text: str


def read_documents(config: CorpusConfig) -> list[Document]:
    """Every document of a corpus: one per text file, or one per JSONL line."""
    path = Path(config.data)
    if not path.exists():
        raise DataError(path, None, None, "not found", "an existing folder or file")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(path, None, None, "folder holds no text files",
                            f"files ending in {' or '.join(TEXT_SUFFIXES)}")
        return [Document(str(file), None, read_text(file)) for file in files]
    if path.suffix == ".jsonl":
        return [_document(row, config.text_field) for row in read_file(path, (config.text_field,))]
    if path.suffix in TEXT_SUFFIXES:
        return [Document(str(path), None, read_text(path))]
    raise DataError(path, None, None, "not a corpus",
                    f"a folder of {'/'.join(TEXT_SUFFIXES)} files or a .jsonl file")


def _document(row: RawRow, field: str) -> Document:
    text = row.fields[field]
    if not isinstance(text, str):
        raise DataError(row.source, row.line, field, f"a {type(text).__name__}", "a string")
    return Document(row.source, row.line, text)


def clean(text: str) -> str:
    """Text without invisible characters or Markdown markup, with normalized spacing."""
    text = _INVISIBLE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = text.replace("\u00a0", " ").replace("\u3000", " ").replace("\t", " ")
    for pattern, replacement in _MARKUP:
        text = pattern.sub(replacement, text)
    return re.sub(r"[ ]{2,}", " ", text)


def paragraphs(text: str) -> list[str]:
    """Paragraphs (blocks between blank lines), their wrapped lines joined."""
    blocks = re.split(r"\n\s*\n", text)
    return [_join_lines(block) for block in blocks if block.strip()]


def _join_lines(block: str) -> str:
    """Join a paragraph's lines: with a space in Latin text, directly between CJK characters."""
    joined = ""
    for line in (part.strip() for part in block.split("\n")):
        if not line:
            continue
        cjk_seam = joined and _CJK.match(joined[-1]) and _CJK.match(line[0])
        joined = line if not joined else joined + ("" if cjk_seam else " ") + line
    return joined


def sentences(text: str) -> list[str]:
    """Sentences of a text (Chinese and Latin punctuation; a line break ends one too)."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def chunk(parts: list[str], limit: int) -> list[str]:
    """Pack paragraphs into chunks of at most `limit` characters, in order; a longer
    paragraph is cut at sentence ends (and a longer sentence at `limit`)."""
    pieces = [piece for part in parts for piece in _fit(part, limit)]
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 1 + len(piece) <= limit:
            chunks[-1] += "\n" + piece
        else:
            chunks.append(piece)
    return chunks


def _fit(paragraph: str, limit: int) -> list[str]:
    if len(paragraph) <= limit:
        return [paragraph]
    out: list[str] = []
    for sentence in sentences(paragraph):
        while len(sentence) > limit:
            out.append(sentence[:limit])
            sentence = sentence[limit:]
        if out and len(out[-1]) + 1 + len(sentence) <= limit:
            out[-1] += " " + sentence
        else:
            out.append(sentence)
    return out


def _new_sentences(paragraph: str, seen: set[str], dropped: Counter[str]) -> str:
    """The paragraph without sentences already seen in the corpus (repeated boilerplate)."""
    parts = sentences(paragraph)
    fresh = [s for s in parts if _key(s) not in seen]
    seen.update(_key(s) for s in parts)
    if len(fresh) == len(parts):
        return paragraph
    dropped["duplicate sentence"] += len(parts) - len(fresh)
    joiner = "" if _CJK.search(paragraph) else " "
    return joiner.join(fresh)


def _key(paragraph: str) -> str:
    """Deduplication key: case-folded, whitespace removed."""
    return hashlib.sha256(re.sub(r"\s+", "", paragraph).casefold().encode()).hexdigest()


CHUNKS_SCHEMA = pa.DataFrameSchema({
    "id": pa.Column(str, unique=True),
    "text": pa.Column(str, pa.Check(lambda s: s.str.strip().str.len() > 0)),
    "source": pa.Column(str),
    "numeric": pa.Column(bool),
}, strict=True)


def build_corpus(name: str, config: CorpusConfig, out_dir: str | Path) -> dict[str, Any]:
    """Clean, deduplicate and chunk one corpus into `out_dir` (atomically); its manifest."""
    documents = read_documents(config)
    seen: set[str] = set()
    sentences_seen: set[str] = set()
    dropped: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    for number, document in enumerate(documents):
        kept = []
        for paragraph in paragraphs(clean(document.text)):
            if len(paragraph) < config.min_chars:
                dropped["shorter than min_chars"] += 1
            elif (key := _key(paragraph)) in seen:
                dropped["duplicate paragraph"] += 1
            else:
                seen.add(key)
                paragraph = _new_sentences(paragraph, sentences_seen, dropped)
                kept += [paragraph] if paragraph else []
        where = document.source + (f":{document.line}" if document.line else "")
        for index, text in enumerate(chunk(kept, config.chunk_chars)):
            rows.append({"id": f"{name}-{number:04d}-{index:03d}", "text": text,
                         "source": where, "numeric": has_numeric(text)})
    if not rows:
        raise DataError(config.data, None, None, "no text left after cleaning",
                        f"paragraphs of at least {config.min_chars} characters")
    CHUNKS_SCHEMA.validate(pd.DataFrame(rows))
    lengths = [len(r["text"]) for r in rows]
    manifest = {
        "corpus": name, "documents": len(documents), "paragraphs_kept": len(seen),
        "dropped": dict(dropped), "chunks": len(rows), "characters": sum(lengths),
        "chunk_chars": {"max": max(lengths), "mean": round(sum(lengths) / len(rows), 1)},
        "numeric_chunks": sum(r["numeric"] for r in rows),
        "sources": sha256_tree(config.data), "config": config.model_dump(mode="json"),
        "packages": package_versions(("fin-tasks",)),
    }
    with atomic_dir(out_dir) as scratch:
        write_jsonl(scratch / "chunks.jsonl", rows)
        manifest["outputs"] = {"chunks.jsonl": sha256_file(scratch / "chunks.jsonl")}
        write_json(scratch / "manifest.json", manifest)
    log.info("corpus %s: %d documents, %d paragraphs, %d chunks (%s dropped)", name,
             len(documents), len(seen), len(rows), dict(dropped) or "none")
    return manifest
