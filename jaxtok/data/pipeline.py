"""From a source to per-host batches: source -> pack (once, in memory) -> shuffle -> repeat ->
global batch -> this host's block.

The corpus is packed once into arrays (optionally cached as ``.npz``); Grain then shuffles row
*indices* and each batch is one numpy gather, so no per-example Python work is done while
training. Every host computes the same shuffled global batch of indices and keeps the block
``[i * b, (i + 1) * b)`` of it (``b = global_batch // process_count``), so stacking the hosts'
batches in process order gives exactly the batch one host would read: a run's data does not
depend on how many hosts it runs on. Trainer use::

    it = make_train_iterator(config, tokenizer)           # this process's share
    batch = next(it)                                      # dict of int32 numpy arrays
    state = it.get_state()                                # save with the checkpoint (JSON-able)
    it = make_train_iterator(config, tokenizer); it.set_state(state)   # resume: same batches
    global_batch = jax.make_array_from_process_local_data(sharding, batch["tokens"])
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grain
import jax
import numpy as np
from tokenizers import Tokenizer

from jaxtok.data import packing, sources

Batch = dict[str, np.ndarray]
_CACHE_FORMAT = 1  # bump when the packed layout changes, so old caches are not reused


class SourceKind(enum.StrEnum):
    """Where documents come from."""

    STDLIB = "stdlib"  # the embedded corpus: this Python's standard library sources
    TEXT = "text"  # local text files (``paths``)
    JSONL = "jsonl"  # local JSON-lines files (``paths``, ``text_field``)
    TFDS = "tfds"  # a prepared TFDS dataset (``tfds_name``, ``tfds_data_dir``)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to batch it.

    Attributes:
      source: where documents come from (a SourceKind or its string value).
      paths: files, directories or glob patterns for TEXT / JSONL.
      text_field: the JSONL field or TFDS feature holding the text.
      split_on_blank_lines: TEXT only: one document per blank-line-separated block, not file.
      tfds_name: TFDS dataset name (``name[/config][:version]``) for TFDS.
      tfds_data_dir: TFDS data directory (None: TFDS's default).
      train_split / eval_split: TFDS split names used for training and evaluation.
      validation_fraction: share of documents held out for evaluation, by hash, for sources
        without their own splits (STDLIB, TEXT, JSONL).
      max_documents: read at most this many documents per split (None: all); for quick runs.
      seq_len: tokens per row.
      global_batch: rows per step over all hosts; must divide by the number of hosts.
      seed: shuffle seed (each epoch is reshuffled from it).
      num_epochs: passes over the training rows (None: forever).
      bos_token / eos_token: tokens put before / after every document (None: none).
      cache_dir: where packed corpora are cached as ``.npz`` (None: no cache).
      prefetch: batches prepared ahead of the training step by a background thread.
    """

    source: SourceKind = SourceKind.STDLIB
    paths: tuple[str, ...] = ()
    text_field: str = "text"
    split_on_blank_lines: bool = False
    tfds_name: str = ""
    tfds_data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    validation_fraction: float = 0.05
    max_documents: int | None = None
    seq_len: int = 1024
    global_batch: int = 8
    seed: int = 0
    num_epochs: int | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    cache_dir: str | None = None
    prefetch: int = 2

    def __post_init__(self):
        # Accept CLI-style values ("jsonl", a single path) while keeping the fields typed.
        object.__setattr__(self, "source", SourceKind(self.source))
        paths = (self.paths,) if isinstance(self.paths, (str, os.PathLike)) else self.paths
        object.__setattr__(self, "paths", tuple(os.fspath(p) for p in paths))
        if self.seq_len < 1 or self.global_batch < 1:
            sizes = f"{self.seq_len}, {self.global_batch}"
            raise ValueError(f"seq_len and global_batch must be >= 1, got {sizes}")
        if not 0.0 <= self.validation_fraction < 1.0:
            fraction = self.validation_fraction
            raise ValueError(f"validation_fraction must be in [0, 1), got {fraction}")
        if self.source in (SourceKind.TEXT, SourceKind.JSONL) and not self.paths:
            raise ValueError(f"source {self.source.value!r} needs paths")
        if self.source is SourceKind.TFDS and not self.tfds_name:
            raise ValueError("source 'tfds' needs tfds_name")


# ---------------------------------------------------------------------------------------------
# Documents and packed rows


def _stdlib(config: DataConfig, split: str) -> Iterator[str]:
    return sources.stdlib_documents(split, validation_fraction=config.validation_fraction)


def _text(config: DataConfig, split: str) -> Iterator[str]:
    return sources.text_documents(
        config.paths, split_on_blank_lines=config.split_on_blank_lines, split=split,
        validation_fraction=config.validation_fraction,
    )


def _jsonl(config: DataConfig, split: str) -> Iterator[str]:
    return sources.jsonl_documents(
        config.paths, text_field=config.text_field, split=split,
        validation_fraction=config.validation_fraction,
    )


def _tfds(config: DataConfig, split: str) -> Iterator[str]:
    name = config.train_split if split == "train" else config.eval_split
    return sources.tfds_documents(
        config.tfds_name, split=name, data_dir=config.tfds_data_dir, text_field=config.text_field
    )


_READERS: dict[SourceKind, Callable[[DataConfig, str], Iterator[str]]] = {
    SourceKind.STDLIB: _stdlib,
    SourceKind.TEXT: _text,
    SourceKind.JSONL: _jsonl,
    SourceKind.TFDS: _tfds,
}


def load_documents(config: DataConfig, split: str) -> Iterator[str]:
    """The documents of ``split`` ("train" or "validation") named by ``config``."""
    if split not in sources.SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {sources.SPLITS}")
    docs = _READERS[config.source](config, split)
    if config.max_documents is not None:
        docs = (d for _, d in zip(range(config.max_documents), docs))
    return docs


def _source_fingerprint(config: DataConfig) -> list:
    """What identifies the input files: sizes and times of local files, the Python version for
    the stdlib, the dataset name for TFDS (a prepared TFDS dataset does not change)."""
    if config.source in (SourceKind.TEXT, SourceKind.JSONL):
        is_text = config.source is SourceKind.TEXT
        suffixes = sources.TEXT_SUFFIXES if is_text else sources.JSONL_SUFFIXES
        files = sources.resolve_paths(config.paths, suffixes)
        return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    if config.source is SourceKind.STDLIB:
        return [str(sources.stdlib_root()), sys.version]
    return [config.tfds_name, config.tfds_data_dir]


def _cache_path(config: DataConfig, tokenizer: Tokenizer, split: str) -> Path:
    fields = {k: v for k, v in dataclasses.asdict(config).items()
              if k not in ("global_batch", "seed", "num_epochs", "cache_dir", "prefetch")}
    key = json.dumps([_CACHE_FORMAT, split, fields, _source_fingerprint(config)], default=str)
    digest = hashlib.sha256(key.encode())
    digest.update(tokenizer.to_str().encode())
    return Path(config.cache_dir, f"packed-{split}-{digest.hexdigest()[:24]}.npz")


def pack_split(config: DataConfig, tokenizer: Tokenizer, split: str) -> Batch:
    """The packed rows of ``split`` (see ``packing``), from the cache when there is one."""
    path = _cache_path(config, tokenizer, split) if config.cache_dir else None
    if path is not None and path.exists():
        with np.load(path) as cached:
            return {k: cached[k] for k in packing.FIELDS}
    rows = packing.pack_documents(
        load_documents(config, split), tokenizer, config.seq_len,
        bos_id=packing.special_token_id(tokenizer, config.bos_token),
        eos_id=packing.special_token_id(tokenizer, config.eos_token),
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: hosts sharing a file system never see a half-written cache.
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **rows)
        os.replace(tmp, path)
    return rows


# ---------------------------------------------------------------------------------------------
# Batching


def _host_block(global_batch: int, process_index: int | None, process_count: int | None) -> slice:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in [0, {count})")
    if global_batch % count:
        raise ValueError(f"global_batch {global_batch} does not divide by {count} processes")
    per_host = global_batch // count
    return slice(index * per_host, (index + 1) * per_host)


def _gather(rows: Batch, indices: np.ndarray) -> Batch:
    return {k: v[indices] for k, v in rows.items()}


def train_dataset(
    rows: Batch,
    *,
    global_batch: int,
    seed: int,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """Batches of this host's rows: shuffled per epoch by ``seed``, the last partial global
    batch of the run dropped. Process index/count default to JAX's."""
    block = _host_block(global_batch, process_index, process_count)
    num_rows = len(rows["tokens"])
    if num_rows < global_batch:
        raise ValueError(f"the corpus packs into {num_rows} rows, fewer than {global_batch=}")
    # Shuffle before repeat so that epochs are not mixed; batch indices, then gather once.
    indices = grain.MapDataset.range(num_rows).shuffle(seed=seed).repeat(num_epochs)
    batches = indices.batch(global_batch, drop_remainder=True)
    return batches.map(lambda idx: _gather(rows, idx[block]))


def eval_batches(
    rows: Batch,
    *,
    global_batch: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> list[Batch]:
    """Every row once, in order, this host's block of each global batch. The last global batch
    is filled with padding rows (nothing scored, 0 bytes) so every host runs the same steps."""
    block = _host_block(global_batch, process_index, process_count)
    num_rows, seq_len = rows["tokens"].shape
    missing = -num_rows % global_batch
    filler = packing.empty_rows(missing, seq_len)
    padded = {k: np.concatenate([v, filler[k]]) for k, v in rows.items()}
    starts = range(0, num_rows + missing, global_batch)
    return [_gather(padded, np.arange(s, s + global_batch)[block]) for s in starts]


def make_train_iterator(
    config: DataConfig,
    tokenizer: Tokenizer,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """This host's training batches; ``get_state()`` / ``set_state()`` resume exactly."""
    rows = pack_split(config, tokenizer, "train")
    dataset = train_dataset(
        rows, global_batch=config.global_batch, seed=config.seed, num_epochs=config.num_epochs,
        process_index=process_index, process_count=process_count,
    )
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=config.prefetch)
    return iter(dataset.to_iter_dataset(options))


def make_eval_batches(
    config: DataConfig,
    tokenizer: Tokenizer,
    process_index: int | None = None,
    process_count: int | None = None,
) -> list[Batch]:
    """This host's evaluation batches over the whole validation split (see ``eval_batches``)."""
    rows = pack_split(config, tokenizer, "validation")
    return eval_batches(
        rows, global_batch=config.global_batch,
        process_index=process_index, process_count=process_count,
    )
