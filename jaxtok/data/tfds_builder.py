"""Turn local text / JSONL files into a TFDS dataset in array_record format.

The result is read back without TensorFlow by ``tfds.data_source(name, split=..., data_dir=...)``
(or ``sources.tfds_documents``). Builders are made per call and never registered in TFDS's
global registry: reading finds the dataset by its files in ``data_dir``.

Example::

    build_text_dataset(["corpus/*.txt"], "/data/tfds", name="my_corpus", validation_fraction=0.05)
    docs = tfds_documents("my_corpus", split="validation", data_dir="/data/tfds")
"""

from __future__ import annotations

import os
import re
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import tensorflow_datasets as tfds

from jaxtok.data import sources

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class TextFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Documents from local files as a TFDS dataset with one feature ``text``.

    Splits: ``train``, plus ``validation`` when ``validation_fraction`` > 0 (by the hash of each
    document's text, the same rule as the file sources). Order is kept (no TFDS shuffling), so
    reading back gives the documents in the order they were read.
    """

    VERSION = tfds.core.Version("1.0.0")

    def __init__(
        self,
        *,
        read_documents: Callable[[str | None], Iterator[str]],
        validation_fraction: float = 0.0,
        **kwargs,
    ):
        """``read_documents(split)`` yields the documents of a split (None: all)."""
        self._read_documents = read_documents
        self._validation_fraction = validation_fraction
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly: dataset_info_from_configs looks for metadata files beside the module.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Documents from local text or JSONL files.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        if self._validation_fraction <= 0:
            return {"train": self._generate_examples(None)}
        # TFDS refuses to write an empty split: only declare the ones with documents.
        names = [s for s in sources.SPLITS if next(self._split_documents(s), None) is not None]
        return {s: self._generate_examples(s) for s in names}

    def _split_documents(self, split: str | None) -> Iterator[str]:
        try:
            return self._read_documents(split)
        except sources.EmptySourceError:
            return iter(())

    def _generate_examples(self, split: str | None):
        for index, text in enumerate(self._split_documents(split)):
            yield index, {"text": text}


def _builder_class(name: str) -> type[TextFilesBuilder]:
    """A subclass named ``name`` (TFDS takes a dataset's name from its class)."""
    if not _NAME.match(name):
        raise ValueError(f"dataset name {name!r} must be snake_case: lowercase letters, digits, _")
    return types.new_class(
        name, (TextFilesBuilder,), {"skip_registration": True}, lambda ns: ns.update(name=name)
    )


def build_text_dataset(
    paths: sources.PathArg,
    data_dir: str | os.PathLike,
    *,
    name: str = "text_files",
    jsonl: bool | None = None,
    text_field: str = "text",
    split_on_blank_lines: bool = False,
    validation_fraction: float = 0.0,
) -> Path:
    """Builds (or reuses, if already there) the dataset ``name`` in ``data_dir`` from ``paths``.

    ``jsonl=None``: JSON lines if every file ends in ``.jsonl``, else plain text.
    Returns the dataset's version directory.
    """
    files = sources.resolve_paths(paths, sources.TEXT_SUFFIXES + sources.JSONL_SUFFIXES)
    if jsonl is None:
        jsonl = all(f.suffix == ".jsonl" for f in files)

    def read(split: str | None) -> Iterator[str]:
        if jsonl:
            return sources.jsonl_documents(
                files, text_field=text_field, split=split, validation_fraction=validation_fraction
            )
        return sources.text_documents(
            files, split_on_blank_lines=split_on_blank_lines, split=split,
            validation_fraction=validation_fraction,
        )

    read(None)  # fail now, with the path in the message, if the files hold no documents
    builder = _builder_class(name)(
        read_documents=read, validation_fraction=validation_fraction, data_dir=os.fspath(data_dir)
    )
    builder.download_and_prepare()
    return Path(builder.data_dir)
