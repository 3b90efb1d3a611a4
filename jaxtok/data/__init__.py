"""Data: document sources -> tokenize -> pack into rows -> per-host batches (Grain).

``make_train_iterator(config, tokenizer)`` and ``make_eval_batches(config, tokenizer)`` are what a
trainer calls; the rest is for custom pipelines. ``build_text_dataset`` (from
``jaxtok.data.tfds_builder``) is loaded on first use, since it imports tensorflow_datasets.
"""

from jaxtok.data.packing import (
    FIELDS,
    encode_documents,
    pack_documents,
    pack_encoded,
    special_token_id,
    token_byte_lengths,
)
from jaxtok.data.pipeline import (
    DataConfig,
    SourceKind,
    eval_batches,
    load_documents,
    make_eval_batches,
    make_train_iterator,
    pack_split,
    train_dataset,
)
from jaxtok.data.sources import (
    EmptySourceError,
    jsonl_documents,
    resolve_paths,
    stdlib_documents,
    stdlib_files,
    text_documents,
    tfds_documents,
)

__all__ = [
    "FIELDS",
    "DataConfig",
    "EmptySourceError",
    "SourceKind",
    "build_text_dataset",
    "encode_documents",
    "eval_batches",
    "jsonl_documents",
    "load_documents",
    "make_eval_batches",
    "make_train_iterator",
    "pack_documents",
    "pack_encoded",
    "pack_split",
    "resolve_paths",
    "special_token_id",
    "stdlib_documents",
    "stdlib_files",
    "text_documents",
    "tfds_documents",
    "token_byte_lengths",
    "train_dataset",
]


def __getattr__(name: str):
    # Lazy: tensorflow_datasets is only imported by those who build TFDS datasets.
    if name == "build_text_dataset":
        from jaxtok.data.tfds_builder import build_text_dataset

        return build_text_dataset
    raise AttributeError(f"module 'jaxtok.data' has no attribute {name!r}")
