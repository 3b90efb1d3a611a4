"""Batch-level BPE over the lines of a text file (what ``jaxtok dynamic-bpe`` runs)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from jaxtok.dynamic.boundaries import check_mode, encode_lines
from jaxtok.dynamic.merge import MergeImpl, compile_merge, pad_batch, result_merges, result_units

TOKENIZER_NAMES = ("smollm2-135m", "minilm-l6")


def load_base_tokenizer(name: str):
    """A ``tokenizers.Tokenizer``: a model name (``smollm2-135m``, ``minilm-l6``) or a
    ``tokenizer.json`` path."""
    from tokenizers import Tokenizer

    if name == "smollm2-135m":
        from jaxtok.io.gguf_io import open_gguf, read_tokenizer, smollm2_path

        path = smollm2_path()
        return read_tokenizer(open_gguf(path), path).hf
    if name == "minilm-l6":
        from jaxtok.io.cache import package_dir
        from jaxtok.io.safetensors_io import MINILM_PACKAGE

        root = package_dir(MINILM_PACKAGE)
        return Tokenizer.from_file(str((root / "model" if (root / "model").is_dir() else root) / "tokenizer.json"))
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"tokenizer {name!r} is neither a model name ({', '.join(TOKENIZER_NAMES)}) "
                         "nor an existing tokenizer.json file")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust binding raises plain Exception on bad JSON
        raise ValueError(f"{path}: not a tokenizers JSON file: {exc}") from None


def read_lines(path: str | os.PathLike) -> list[str]:
    """The sequences of a text file: ``text.split("\\n")`` without the lines that are empty
    after ``strip()``; a file without any is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: text file not found")
    lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no non-empty lines to merge")
    return lines


@dataclasses.dataclass
class TextMerge:
    """The merged batches of a text: per batch each sequence's units (tuples of base ids) and
    the ordered merges; totals and timings (``seconds`` excludes compilation)."""

    batches: list[dict]
    tokens_before: int
    tokens_after: int
    seconds: float
    compile_seconds: float

    @property
    def merges(self) -> int:
        return sum(len(b["merges"]) for b in self.batches)

    @property
    def reduction(self) -> float:
        return 1.0 - self.tokens_after / max(self.tokens_before, 1)

    def result_line(self) -> str:
        return (f"RESULT tokens_before={self.tokens_before} tokens_after={self.tokens_after} "
                f"reduction={self.reduction:.4f} merges={self.merges} seconds={self.seconds:.4f} "
                f"compile_seconds={self.compile_seconds:.3f}")

    def to_json(self) -> dict:
        return {"batches": [{"units": [[list(u) for u in seq] for seq in b["units"]],
                             "merges": [[list(left), list(right)] for left, right in b["merges"]]}
                            for b in self.batches]}

    def write_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json()), encoding="utf-8")
        tmp.replace(path)  # never a half-written file
        return path


def check_options(batch_size: int, seq_len: int, max_merges: int, boundary: str) -> None:
    """Clear errors for sizes below 1 (merges below 0) and unknown boundary modes."""
    check_mode(boundary)
    for name, value, least in (("batch size", batch_size, 1), ("sequence length", seq_len, 1),
                               ("merges", max_merges, 0)):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")


def merge_lines(tokenizer, lines: Sequence[str], *, batch_size: int, seq_len: int, max_merges: int,
                min_count: int = 2, boundary: str = "pretoken", max_unit_tokens: int = 0,
                impl: MergeImpl | str = MergeImpl.AUTO) -> TextMerge:
    """Each line encoded (``boundaries.encode_lines``), consecutive batches of ``batch_size``
    lines (the last may be smaller) merged on device, ``max_merges`` merges at most per batch."""
    check_options(batch_size, seq_len, max_merges, boundary)
    if not lines:
        raise ValueError("no lines to merge")
    ids, bounds = encode_lines(tokenizer, lines, seq_len, boundary)
    width = max(1, min(seq_len, max(len(s) for s in ids)))  # one padded shape for every batch
    start = time.perf_counter()
    merge = compile_merge(batch_size, width, max_merges=max_merges, max_unit_tokens=max_unit_tokens, impl=impl)
    compile_seconds = time.perf_counter() - start
    batches, seconds, after = [], 0.0, 0
    for lo in range(0, len(ids), batch_size):
        seqs, bnds = ids[lo:lo + batch_size], bounds[lo:lo + batch_size]
        extra = batch_size - len(seqs)  # the short last batch: empty rows take part in nothing
        grid, bnd, lengths = pad_batch(seqs + [[]] * extra, bnds + [[]] * extra, width)
        start = time.perf_counter()
        result = jax.block_until_ready(merge(grid, bnd, lengths, np.int32(min_count)))
        seconds += time.perf_counter() - start
        units = result_units(result, grid, lengths)[:len(seqs)]
        after += sum(len(u) for u in units)
        batches.append({"units": units, "merges": result_merges(result)})
    return TextMerge(batches=batches, tokens_before=sum(len(s) for s in ids), tokens_after=after,
                     seconds=seconds, compile_seconds=compile_seconds)


def show_units(tokenizer, units: Sequence[Sequence[int]], sep: str = "|") -> str:
    """A sequence's text with ``sep`` between its units."""
    return sep.join(tokenizer.decode(list(u), skip_special_tokens=False) for u in units)
