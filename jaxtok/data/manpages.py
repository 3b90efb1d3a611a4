"""Running text in other languages from Debian's translated man pages (``manpages-de``, ``-es``,
``-it``: ``apt-get install`` them), with one fixed file-level split that every tokenizer-transfer
experiment shares.

A file goes by the sha1 bucket of its key (``<lang>/<path under /usr/share/man/<lang>>``):
below 0.70 it trains target tokenizers (and donors), below 0.85 the hypernetwork, the rest is
held out for evaluation. The split never depends on which other files are installed.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from jaxtok.data.sources import validation_bucket

LANGS = ("de", "es", "it")
SPLIT_EDGES = (0.70, 0.85)  # tokenizer | hypernetwork | evaluation
MAN_ROOT = Path("/usr/share/man")


_ESCAPES = [(re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\s[+-]?\d+"), ""),
            (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\\((em|en)"), "—"),
            (re.compile(r"\\\((lq|rq|Lq|Rq)"), '"'), (re.compile(r"\\\(.."), ""), (re.compile(r"\\[-e]"), "-"),
            (re.compile(r"\\[&|^%c]"), ""), (re.compile(r"\\ "), " ")]
_TEXT_MACROS = {"SH", "SS", "B", "I", "BI", "BR", "IB", "IR", "RB", "RI", "SM", "SB", "IP", "TP", "UR", "MT"}


def strip_roff(source: str) -> str:
    """Running text of a man page: comments and layout requests dropped, the text of font and
    heading macros kept, inline escapes removed (good enough for language-model text)."""
    lines = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\\\"')):
            continue
        if line.startswith((".", "'")):
            name, _, rest = line[1:].strip().partition(" ")
            if name not in _TEXT_MACROS or not rest.strip():
                if name in ("PP", "LP", "P", "SH", "SS", "sp", "br"):
                    lines.append("")
                continue
            line = rest.replace('"', "")
        for pattern, repl in _ESCAPES:
            line = pattern.sub(repl, line)
        lines.append(line.rstrip())
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def manpage_split(langs=LANGS, root: Path = MAN_ROOT) -> dict[str, list[tuple[str, str]]]:
    """{"tokenizer"|"hypernetwork"|"evaluation": [(key, text), ...]} over the man pages of ``langs``
    (empty lists for languages not installed)."""
    split: dict[str, list[tuple[str, str]]] = {"tokenizer": [], "hypernetwork": [], "evaluation": []}
    for lang in langs:
        folder = Path(root) / lang
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = f"{lang}/{path.relative_to(folder).as_posix()}"
            raw = path.read_bytes()
            if path.suffix == ".gz":
                raw = gzip.decompress(raw)
            try:
                text = strip_roff(raw.decode("utf-8"))
            except UnicodeDecodeError:
                continue
            if len(text) < 200 or text.lstrip().startswith(".so"):
                continue
            bucket = validation_bucket(key)
            part = ("tokenizer" if bucket < SPLIT_EDGES[0] else
                    "hypernetwork" if bucket < SPLIT_EDGES[1] else "evaluation")
            split[part].append((key, text))
    return split
