"""``text:<path or glob>`` sources: the user's own UTF-8 text files.

A path may be a file, a folder (all files below it) or a glob (``**`` allowed).
Documents are the blank-line separated blocks of each file (long blocks cut at
line ends into pieces of at most ``MAX_DOC_BYTES``), so even one file yields a
held-out split by document.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from pathlib import Path
from typing import Callable, Iterator

from llm.config import ConfigError

MAX_DOC_BYTES = 65536
_BLANK = re.compile(r"\n[ \t\r\f\v]*\n")


def visible_files(root: Path) -> list[Path]:
    """Files below ``root``, skipping hidden ones (.git, .DS_Store, ...)."""
    return sorted(
        p for p in Path(root).rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def text_files(pattern: str) -> list[Path]:
    """Sorted files named by ``pattern``; ConfigError when none exist."""
    expanded = os.path.expanduser(pattern)
    if os.path.isdir(expanded):
        files = visible_files(Path(expanded))
    elif glob.has_magic(expanded):
        files = [Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p)]
    elif os.path.isfile(expanded):
        files = [Path(expanded)]
    else:
        raise ConfigError(f"data.source text:{pattern}: file not found")
    if not files:
        raise ConfigError(f"data.source text:{pattern}: no file matches")
    return sorted(files)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"data.source: {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err


def _blocks(text: str) -> Iterator[str]:
    for block in _BLANK.split(text):
        block = block.strip("\n")
        if not block.strip():
            continue
        if len(block) <= MAX_DOC_BYTES // 4 or len(block.encode("utf-8")) <= MAX_DOC_BYTES:
            yield block
            continue
        piece, size = [], 0
        for line in block.split("\n"):
            n = len(line.encode("utf-8")) + 1
            if piece and size + n > MAX_DOC_BYTES:
                yield "\n".join(piece)
                piece, size = [], 0
            piece.append(line)
            size += n
        if piece:
            yield "\n".join(piece)


def text_corpus(pattern: str) -> tuple[str, Callable[[], Iterator[tuple[str, str]]]]:
    """(content fingerprint, function returning an iterator of (document key, text))."""
    files = text_files(pattern)
    h = hashlib.sha256(b"text:v1")
    for path in files:
        h.update(str(path.resolve()).encode())
        h.update(path.read_bytes())

    def documents() -> Iterator[tuple[str, str]]:
        for path in files:
            for i, block in enumerate(_blocks(_read(path))):
                yield f"{path}#{i}", block

    return h.hexdigest(), documents
