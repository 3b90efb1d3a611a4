"""Document sources. Each returns an iterator of documents (``str``), checked eagerly.

* ``stdlib_documents`` — the embedded default corpus: the ``.py`` files of the running Python's
  standard library (real text on every machine with Python, no download), one document a file.
* ``text_documents`` / ``jsonl_documents`` — local files, directories or glob patterns.
* ``tfds_documents`` — a prepared TFDS dataset read through ``tfds.data_source`` (array_record,
  no TensorFlow needed); ``tfds_builder.build_text_dataset`` makes one from local files.

Sources without splits of their own are split into ``train`` / ``validation`` by a hash of a
stable key (the file's relative path for the stdlib, the text itself for local files), so a
document lands in the same split on every machine and run. Errors name the path and the problem:
a path that does not exist raises FileNotFoundError, one that yields no documents or holds bad
data (undecodable bytes, bad JSON, a missing text field) raises ValueError.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

SPLITS = ("train", "validation")
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
# Parts of the stdlib tree that are not library code (tests, the IDLE app, installed packages).
STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}
)

PathArg = str | os.PathLike | Sequence[str | os.PathLike]


# ---------------------------------------------------------------------------------------------
# Splitting


def validation_bucket(key: str) -> float:
    """A number in [0, 1) fixed by ``key``. sha1 rather than ``hash()``, which is salted per
    process."""
    digest = hashlib.sha1(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def in_split(key: str, split: str | None, validation_fraction: float) -> bool:
    """Whether the document keyed ``key`` belongs to ``split`` (None: every split)."""
    if split is None:
        return True
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS} (or None for all)")
    is_validation = validation_bucket(key) < validation_fraction
    return is_validation == (split == "validation")


class EmptySourceError(ValueError):
    """A source (or the asked split of it) holds no documents."""


def _require_nonempty(docs: Iterator[str], what: str) -> Iterator[str]:
    """Fetches the first document now, so that an empty source fails at the call, not later."""
    first = next(docs, None)
    if first is None:
        raise EmptySourceError(f"{what} yielded no documents")
    return itertools.chain([first], docs)


# ---------------------------------------------------------------------------------------------
# Embedded corpus: the standard library


def stdlib_root() -> Path:
    """Where the running Python keeps its standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """Sorted ``.py`` files of the standard library, without tests, IDLE and site-packages."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory {root} does not exist")
    found = []
    for folder, subdirs, names in os.walk(root):
        # Prune in place so os.walk never descends into site-packages (thousands of files).
        subdirs[:] = sorted(d for d in subdirs if d not in STDLIB_SKIP_DIRS)
        found.extend(Path(folder, n) for n in names if n.endswith(".py"))
    return sorted(found)


def stdlib_documents(
    split: str | None = "train",
    *,
    validation_fraction: float = 0.05,
    root: str | os.PathLike | None = None,
) -> Iterator[str]:
    """The standard library's own sources, one document per file, in sorted path order.

    The split is decided by the hash of the path relative to the library root, so only the
    files of the asked split are read. Files that are not UTF-8 or are blank are skipped.
    """
    root = Path(root) if root is not None else stdlib_root()
    files = [
        p for p in stdlib_files(root)
        if in_split(p.relative_to(root).as_posix(), split, validation_fraction)
    ]

    def read() -> Iterator[str]:
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                yield text

    return _require_nonempty(read(), f"standard library at {root} (split {split!r})")


# ---------------------------------------------------------------------------------------------
# Local files


def _as_list(paths: PathArg) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    return [os.fspath(p) for p in paths]


def resolve_paths(paths: PathArg, suffixes: Sequence[str]) -> list[Path]:
    """Files named by ``paths``: files as given, directories searched recursively for
    ``suffixes``, glob patterns expanded (sorted). Raises when a path names nothing."""
    items = _as_list(paths)
    if not items:
        raise ValueError("no paths given")
    files: list[Path] = []
    for item in items:
        if glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise FileNotFoundError(f"no files match the pattern {item!r}")
            files.extend(matches)
        elif Path(item).is_dir():
            matches = sorted(
                p for p in Path(item).rglob("*") if p.is_file() and p.suffix in suffixes
            )
            if not matches:
                wanted = " or ".join(suffixes)
                raise ValueError(f"directory {item} holds no files ending in {wanted}")
            files.extend(matches)
        elif Path(item).is_file():
            files.append(Path(item))
        else:
            raise FileNotFoundError(f"path {item} does not exist")
    return files


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def _blank_line_blocks(text: str) -> Iterator[str]:
    """Paragraphs: runs of lines separated by lines that are empty or only whitespace."""
    block: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block)
            block = []
    if block:
        yield "".join(block)


def _keep(docs: Iterable[str], split: str | None, fraction: float) -> Iterator[str]:
    # Local documents are split by their own text: duplicates land in the same split.
    return (d for d in docs if d.strip() and in_split(d, split, fraction))


def text_documents(
    paths: PathArg,
    *,
    split_on_blank_lines: bool = False,
    suffixes: Sequence[str] = TEXT_SUFFIXES,
    split: str | None = None,
    validation_fraction: float = 0.05,
) -> Iterator[str]:
    """Documents from UTF-8 text files: one per file, or one per blank-line-separated block."""
    files = resolve_paths(paths, suffixes)

    def read() -> Iterator[str]:
        for path in files:
            text = _read_utf8(path)
            docs = _blank_line_blocks(text) if split_on_blank_lines else [text]
            yield from _keep(docs, split, validation_fraction)

    return _require_nonempty(read(), f"text files {[str(f) for f in files]} (split {split!r})")


def _jsonl_text(line: str, text_field: str, where: str) -> str:
    """The text of one JSONL record; ``where`` (file:line) goes into every error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
    if not isinstance(record, dict) or text_field not in record:
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: no text field {text_field!r} (found {found})")
    text = record[text_field]
    if not isinstance(text, str):
        # ValueError, not TypeError: the file's content is wrong, not an argument.
        kind = type(text).__name__
        raise ValueError(f"{where}: field {text_field!r} is {kind}, not a string")  # noqa: TRY004
    return text


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        try:
            for lineno, line in enumerate(handle, start=1):
                if line.strip():
                    yield _jsonl_text(line, text_field, f"{path}:{lineno}")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text ({err.reason})") from None


def jsonl_documents(
    paths: PathArg,
    *,
    text_field: str = "text",
    suffixes: Sequence[str] = JSONL_SUFFIXES,
    split: str | None = None,
    validation_fraction: float = 0.05,
) -> Iterator[str]:
    """Documents from JSON-lines files, one per line, taken from the field ``text_field``."""
    files = resolve_paths(paths, suffixes)

    def read() -> Iterator[str]:
        for path in files:
            yield from _keep(_jsonl_texts(path, text_field), split, validation_fraction)

    return _require_nonempty(read(), f"JSONL files {[str(f) for f in files]} (split {split!r})")


# ---------------------------------------------------------------------------------------------
# TFDS


def tfds_documents(
    name: str,
    *,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    text_field: str = "text",
    chunk: int = 1024,
) -> Iterator[str]:
    """Documents of a prepared TFDS dataset, read through ``tfds.data_source`` (array_record).

    Nothing is downloaded or generated: the dataset must already be in ``data_dir``.
    """
    # Imported here: tensorflow_datasets costs ~0.5 s to import and only this source needs it.
    import tensorflow_datasets as tfds

    where = data_dir if data_dir is not None else "the default TFDS data_dir"
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.DatasetNotFoundError:
        # TFDS's own message lists every catalogue dataset; the path is what helps here.
        raise FileNotFoundError(f"TFDS dataset {name!r} not found in {where}") from None
    except (AssertionError, FileNotFoundError, NotImplementedError) as err:
        first = str(err).splitlines()[0]
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared as array_record in {where}: {first}"
        ) from None
    except ValueError as err:  # e.g. an unknown split
        raise ValueError(f"TFDS dataset {name!r} in {where}: {err}") from None
    if len(source) == 0:
        raise EmptySourceError(f"TFDS dataset {name!r} split {split!r} in {where} is empty")
    if text_field not in source[0]:
        features = sorted(source[0])
        raise ValueError(f"TFDS dataset {name!r} has no feature {text_field!r} (has {features})")

    def read() -> Iterator[str]:
        # Batched reads: array_record serves a list of indices much faster than one at a time.
        for start in range(0, len(source), chunk):
            for record in source.__getitems__(range(start, min(start + chunk, len(source)))):
                text = record[text_field]
                yield text.decode("utf-8") if isinstance(text, bytes) else str(text)

    return read()
