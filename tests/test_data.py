"""Data pipeline: sources, packing invariants, Grain iteration (resume, multi-host), TFDS."""

from __future__ import annotations

import dataclasses
import json
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxtok import data
from jaxtok.data import packing, sources

SPECIALS = ["<bos>", "<eos>"]
# Multi-byte characters on purpose: byte counts must hold for 2-, 3- and 4-byte UTF-8.
ALPHABET = "ab é€😀\n"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A tiny byte-level BPE (any text encodes), trained here on a few strings."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(["ab ab aab ba", "é€ 😀 ab", "def f(x):\n    return x\n"] * 4, trainer)
    return tok


def _corpus(tmp_path: Path, count: int = 40) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(count):
        words = " ".join(f"w{(i * 7 + j) % 13}é" for j in range(3 + i % 11))
        (folder / f"doc{i:03d}.txt").write_text(f"document {i}: {words}\n", encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------------------------
# Packing


def _expected(tokenizer, docs, bos, eos):
    """Per document: token ids and byte lengths, as packing should see them."""
    out = []
    for doc in docs:
        enc = tokenizer.encode(doc, add_special_tokens=False)
        if not enc.ids:
            continue
        nbytes = packing.token_byte_lengths(doc, np.asarray(enc.offsets).reshape(-1, 2))
        ids, nb = list(enc.ids), list(nbytes)
        if bos is not None:
            ids, nb = [bos, *ids], [0, *nb]
        if eos is not None:
            ids, nb = [*ids, eos], [*nb, 0]
        out.append((ids, nb))
    return out


def _check_row_layout(rows):
    seg, pos = rows["segment_ids"], rows["positions"]
    for name in ("tokens", "targets", "positions", "loss_mask"):
        assert not rows[name][seg == 0].any(), f"{name} nonzero on padding"
    for r in range(len(seg)):
        valid = seg[r] > 0
        n = int(valid.sum())
        assert valid[:n].all(), "padding only at the end of a row"
        pieces = seg[r, :n]
        assert pieces[0] == 1 and set(np.diff(pieces)) <= {0, 1}, "segments 1, 2, 3... in order"
        for s in np.unique(pieces):
            np.testing.assert_array_equal(pos[r][seg[r] == s], np.arange((pieces == s).sum()))


def _check_documents(rows, doc_of_token):
    """Segments follow documents: each document's tokens are contiguous (row-major) and, within
    a row, one segment whose positions run 0, 1, 2 ...; a new document (or a new row) starts the
    next segment id."""
    seg, pos = rows["segment_ids"], rows["positions"]
    doc = np.full(seg.shape, -1)
    doc[seg > 0] = doc_of_token
    flat = doc.reshape(-1)
    for d in np.unique(doc_of_token):
        where = np.flatnonzero(flat == d)
        assert where[-1] - where[0] + 1 == len(where), f"document {d} is not contiguous"
    for r in range(len(seg)):
        n = int((seg[r] > 0).sum())
        starts = np.r_[True, doc[r, 1:n] != doc[r, :n - 1]]  # where a document (piece) begins
        np.testing.assert_array_equal(seg[r, :n], np.cumsum(starts), err_msg=f"row {r}: one segment per document")
        piece_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
        np.testing.assert_array_equal(pos[r, :n], np.arange(n) - piece_start, err_msg=f"row {r}: positions")


@settings(max_examples=200, deadline=None)
@given(
    docs=st.lists(st.text(ALPHABET, min_size=0, max_size=30), min_size=1, max_size=8),
    seq_len=st.integers(1, 24),
    bos=st.booleans(),
    eos=st.booleans(),
)
def test_packing_invariants(tokenizer, docs, seq_len, bos, eos):
    bos_id = tokenizer.token_to_id("<bos>") if bos else None
    eos_id = tokenizer.token_to_id("<eos>") if eos else None
    expected = _expected(tokenizer, docs, bos_id, eos_id)
    if not expected:
        with pytest.raises(ValueError, match="no documents"):
            packing.pack_documents(docs, tokenizer, seq_len, bos_id=bos_id, eos_id=eos_id)
        return
    rows = packing.pack_documents(docs, tokenizer, seq_len, bos_id=bos_id, eos_id=eos_id)
    assert all(v.dtype == np.int32 for v in rows.values())
    assert rows["tokens"].shape[1] == seq_len
    _check_row_layout(rows)
    valid = rows["segment_ids"] > 0
    # Every token of every document exactly once, in order; targets from the same document.
    stream = [t for ids, _ in expected for t in ids]
    targets = [t for ids, _ in expected for t in [*ids[1:], 0]]
    mask = [m for ids, _ in expected for m in [1] * (len(ids) - 1) + [0]]
    np.testing.assert_array_equal(rows["tokens"][valid], stream)
    np.testing.assert_array_equal(rows["targets"][valid], targets)
    np.testing.assert_array_equal(rows["loss_mask"][valid], mask)
    # A document that fits in a row is not split.
    doc_of_token = np.repeat(np.arange(len(expected)), [len(ids) for ids, _ in expected])
    row_of_token = np.nonzero(valid)[0]
    _check_documents(rows, doc_of_token)
    for d, (ids, _) in enumerate(expected):
        if len(ids) <= seq_len:
            assert len(set(row_of_token[doc_of_token == d])) == 1
    # Bytes: per row, those of the scored targets; with a BOS, the whole text.
    target_bytes = [b for _, nb in expected for b in [*nb[1:], 0]]
    per_row = np.zeros(len(rows["tokens"]), np.int64)
    np.add.at(per_row, row_of_token, target_bytes)
    np.testing.assert_array_equal(rows["num_bytes"], per_row)
    if bos:
        assert rows["num_bytes"].sum() == sum(len(d.encode()) for d in docs)


def test_token_byte_lengths_by_hand():
    # one token per character of 1, 2 and 4 bytes
    lengths = packing.token_byte_lengths("aé😀", np.array([[0, 1], [1, 2], [2, 3]]))
    assert lengths.tolist() == [1, 2, 4]
    # text the tokenizer skipped (a space) goes to the next token; trailing text to the last
    assert packing.token_byte_lengths("a b ", np.array([[0, 1], [2, 3]])).tolist() == [1, 3]
    # a character split over two tokens: all its bytes to the first
    assert packing.token_byte_lengths("€", np.array([[0, 1], [0, 1]])).tolist() == [3, 0]


def test_padding_tokenizer_is_not_padded(tokenizer):
    padded = Tokenizer.from_str(tokenizer.to_str())
    padded.enable_padding(length=32)
    padded.enable_truncation(max_length=3)
    docs = ["ab ab aab", "é€ 😀 ab ab ab ab"]
    want = packing.pack_documents(docs, tokenizer, 8)
    got = packing.pack_documents(docs, padded, 8)
    _assert_batches_equal([got], [want])
    assert padded.padding is not None  # the caller's tokenizer is untouched


def test_packing_layout_by_hand():
    # documents of 3, 2, 6 and 1 tokens into rows of 4: B does not fit after A (1 slot left) and
    # goes to the next row; C is longer than a row, so it starts right after B and runs on
    docs = [([1, 2, 3], [1, 2, 3]), ([4, 5], [4, 1]), ([6, 7, 8, 9, 10, 11], [1, 1, 2, 3, 4, 1]), ([12], [2])]
    rows = packing.pack_encoded([(np.array(ids), np.array(nb)) for ids, nb in docs], seq_len=4)
    np.testing.assert_array_equal(rows["tokens"], [[1, 2, 3, 0], [4, 5, 6, 7], [8, 9, 10, 11], [12, 0, 0, 0]])
    np.testing.assert_array_equal(rows["targets"], [[2, 3, 0, 0], [5, 0, 7, 8], [9, 10, 11, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 0], [1, 1, 2, 2], [1, 1, 1, 1], [1, 0, 0, 0]])
    np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 0], [0, 1, 0, 1], [0, 1, 2, 3], [0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["loss_mask"], [[1, 1, 0, 0], [1, 0, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]])
    # bytes of each row's scored targets: 2 + 3 | 1 (B's 5) + 1 + 2 (C's 7, 8) | 3 + 4 + 1 | none
    np.testing.assert_array_equal(rows["num_bytes"], [5, 4, 8, 0])


@pytest.fixture(scope="module")
def char_tokenizer() -> Tokenizer:
    """One token per character, so every token's UTF-8 size is known by hand."""
    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate("abé€😀 ")}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return tok


def test_num_bytes_are_utf8_bytes_by_hand(char_tokenizer, tmp_path):
    # "aé€": bytes 1 + 2 + 3 = 6 (3 characters); "😀b": 4 + 1 = 5 (2 characters)
    docs = ["aé€", "😀b"]
    a, e, euro, smile, b = (char_tokenizer.token_to_id(c) for c in "aé€😀b")
    rows = packing.pack_documents(docs, char_tokenizer, 4, bos_id=0)
    np.testing.assert_array_equal(rows["tokens"], [[0, a, e, euro], [0, smile, b, 0]])
    np.testing.assert_array_equal(rows["loss_mask"], [[1, 1, 1, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(rows["num_bytes"], [6, 5])  # characters would give [3, 2]
    # without a BOS the first character of each document is context only: é + € | b
    np.testing.assert_array_equal(packing.pack_documents(docs, char_tokenizer, 4)["num_bytes"], [5, 1])
    # the same through the pipeline, from a JSONL file
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    config = data.DataConfig(source="jsonl", paths=str(path), validation_fraction=0.0, seq_len=4,
                             global_batch=2, bos_token="<bos>")
    packed = data.pack_split(config, char_tokenizer, "train")
    np.testing.assert_array_equal(packed["num_bytes"], [6, 5])


def test_long_document_continues_with_new_segment():
    rows = packing.pack_encoded([(np.arange(1, 11), np.ones(10, np.int64))], seq_len=4)
    np.testing.assert_array_equal(rows["tokens"], [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]])
    np.testing.assert_array_equal(rows["targets"], [[2, 3, 4, 5], [6, 7, 8, 9], [10, 0, 0, 0]])
    np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 3]] * 2 + [[0, 1, 0, 0]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1] * 4] * 2 + [[1, 1, 0, 0]])
    np.testing.assert_array_equal(rows["num_bytes"], [4, 4, 1])


# ---------------------------------------------------------------------------------------------
# Pipeline


def _config(folder: Path, **overrides) -> data.DataConfig:
    base = data.DataConfig(source="text", paths=(str(folder),), seq_len=16, global_batch=4,
                           validation_fraction=0.2, eos_token="<eos>", seed=3)
    return dataclasses.replace(base, **overrides)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_iterator_state_restore(tokenizer, tmp_path):
    config = _config(_corpus(tmp_path))
    it = data.make_train_iterator(config, tokenizer, process_index=0, process_count=1)
    _take(it, 3)
    state = it.get_state()
    json.dumps(state)  # storable next to a checkpoint
    after = _take(it, 6)
    resumed = data.make_train_iterator(config, tokenizer, process_index=0, process_count=1)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 6), after)
    assert after[0]["tokens"].shape == (4, 16) and after[0]["num_bytes"].shape == (4,)


def test_two_hosts_split_the_single_host_batches(tokenizer, tmp_path):
    config = _config(_corpus(tmp_path), num_epochs=1)
    rows = data.pack_split(config, tokenizer, "train")
    steps = len(rows["tokens"]) // config.global_batch

    def run(index, count):
        return list(data.make_train_iterator(config, tokenizer, index, count))

    single, host0, host1 = run(0, 1), run(0, 2), run(1, 2)
    assert len(single) == len(host0) == len(host1) == steps
    for one, a, b in zip(single, host0, host1):
        assert a["tokens"].shape == (2, 16)
        for k in one:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), one[k])
    # Over the epoch the hosts read disjoint rows, together the corpus less the remainder
    # (as multisets: a repetitive corpus packs into some identical rows).
    seen = Counter(tuple(r) for batch in host0 + host1 for r in batch["tokens"])
    assert seen.total() == steps * config.global_batch
    assert seen <= Counter(tuple(r) for r in rows["tokens"])


def test_each_epoch_is_a_new_permutation():
    rows = {k: np.arange(8, dtype=np.int32)[:, None] for k in packing.ROW_FIELDS}
    dataset = data.train_dataset(rows, global_batch=4, seed=0, num_epochs=2,
                                 process_index=0, process_count=1)
    order = np.concatenate([b["tokens"][:, 0] for b in dataset])
    assert sorted(order[:8]) == sorted(order[8:]) == list(range(8))
    assert list(order[:8]) != list(order[8:])


def test_eval_batches_cover_validation_once(tokenizer, tmp_path):
    config = _config(_corpus(tmp_path), global_batch=6)
    rows = data.pack_split(config, tokenizer, "validation")
    single = data.make_eval_batches(config, tokenizer, 0, 1)
    tokens = np.concatenate([b["tokens"] for b in single])
    np.testing.assert_array_equal(tokens[: len(rows["tokens"])], rows["tokens"])
    assert not tokens[len(rows["tokens"]):].any() and len(tokens) % 6 == 0
    total = sum(int(b["num_bytes"].sum()) for b in single)
    assert total == rows["num_bytes"].sum()
    hosts = [data.make_eval_batches(config, tokenizer, i, 3) for i in range(3)]
    for step, one in enumerate(single):
        merged = np.concatenate([h[step]["tokens"] for h in hosts])
        np.testing.assert_array_equal(merged, one["tokens"])


def test_train_and_validation_documents_are_disjoint(tmp_path):
    folder = _corpus(tmp_path)
    train = list(sources.text_documents(folder, split="train", validation_fraction=0.3))
    val = list(sources.text_documents(folder, split="validation", validation_fraction=0.3))
    assert train and val and not set(train) & set(val)
    assert sorted(train + val) == sorted(sources.text_documents(folder))


def test_pack_cache_round_trip(tokenizer, tmp_path):
    config = _config(_corpus(tmp_path), cache_dir=str(tmp_path / "cache"))
    first = data.pack_split(config, tokenizer, "train")
    assert len(list((tmp_path / "cache").glob("packed-train-*.npz"))) == 1
    second = data.pack_split(config, tokenizer, "train")
    _assert_batches_equal([first], [second])


# ---------------------------------------------------------------------------------------------
# Sources


def test_embedded_corpus(tokenizer):
    files = sources.stdlib_files()
    assert len(files) > 100 and files == sorted(files) == sources.stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    relative = [f.relative_to(root).as_posix() for f in files]
    assert not [r for r in relative if r.startswith(("test/", "idlelib/", "site-packages/"))]
    train = {r for r in relative if sources.in_split(r, "train", 0.05)}
    val = {r for r in relative if sources.in_split(r, "validation", 0.05)}
    assert val and not train & val and train | val == set(relative)
    first = [next(sources.stdlib_documents("validation")) for _ in range(2)]
    assert first[0] == first[1] and first[0].strip()
    config = data.DataConfig(max_documents=2, seq_len=64, global_batch=2, eos_token="<eos>")
    batch = next(data.make_train_iterator(config, tokenizer))  # host index/count from JAX
    assert batch["tokens"].shape == (2, 64) and batch["loss_mask"].sum() > 0


def test_jsonl_source(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [{"body": "first é"}, {"body": "second"}, {"body": "third 😀"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    assert list(sources.jsonl_documents(path, text_field="body")) == [x["body"] for x in lines]
    config = data.DataConfig(source="jsonl", paths=str(path), text_field="body",
                             validation_fraction=0.0)
    assert list(data.load_documents(config, "train")) == [x["body"] for x in lines]


def test_blank_line_documents(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\nline\n\n \ntwo\n\n\nthree", encoding="utf-8")
    docs = list(sources.text_documents(path, split_on_blank_lines=True))
    assert docs == ["one\nline\n", "two\n", "three"]


def test_tfds_round_trip(tokenizer, tmp_path):
    import tensorflow_datasets as tfds

    folder = _corpus(tmp_path, count=12)
    data_dir = tmp_path / "tfds"
    data.build_text_dataset(folder, data_dir, name="tiny_docs", validation_fraction=0.3)
    want = {s: list(sources.text_documents(folder, split=s, validation_fraction=0.3))
            for s in sources.SPLITS}
    for split in sources.SPLITS:
        got = sources.tfds_documents("tiny_docs", split=split, data_dir=data_dir)
        assert list(got) == want[split]
    raw = tfds.data_source("tiny_docs", split="train", data_dir=str(data_dir), download=False)
    assert [r["text"].decode() for r in raw] == want["train"]
    config = data.DataConfig(source="tfds", tfds_name="tiny_docs", tfds_data_dir=str(data_dir),
                             seq_len=16, global_batch=2)
    assert data.make_eval_batches(config, tokenizer, 0, 1)
    with pytest.raises(ValueError, match="no feature 'body'"):
        sources.tfds_documents("tiny_docs", data_dir=data_dir, text_field="body")
    with pytest.raises(FileNotFoundError, match="missing_docs"):
        sources.tfds_documents("missing_docs", data_dir=data_dir)


def test_errors_name_the_path_and_problem(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nowhere.txt does not exist"):
        sources.text_documents(tmp_path / "nowhere.txt")
    with pytest.raises(FileNotFoundError, match="no files match"):
        sources.text_documents(str(tmp_path / "*.txt"))
    (tmp_path / "only.csv").write_text("x")
    with pytest.raises(ValueError, match="holds no files ending in .txt"):
        sources.text_documents(tmp_path)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(data.EmptySourceError, match="empty.txt"):
        sources.text_documents(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        list(sources.text_documents(tmp_path / "latin1.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no text field 'text' \(found \['body'\]\)"):
        list(sources.jsonl_documents(bad))
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: invalid JSON"):
        sources.jsonl_documents(bad)
    with pytest.raises(ValueError, match="needs paths"):
        data.DataConfig(source="text")
    with pytest.raises(ValueError, match="'nope' is not a valid SourceKind"):
        data.DataConfig(source="nope")
    config = _config(_corpus(tmp_path), global_batch=3)
    with pytest.raises(ValueError, match="does not divide by 2 processes"):
        data.make_train_iterator(config, tokenizer, 0, 2)
    with pytest.raises(ValueError, match="'<pad>' is not in the tokenizer"):
        data.pack_split(_config(tmp_path / "corpus", eos_token="<pad>"), tokenizer, "train")
