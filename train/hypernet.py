"""Training the ZeTT hypernetwork against a frozen base LM (``jaxtok train-hypernet``).

Each step samples a tokenizer from the step's text and a queue of the previous steps' text
(``jaxtok.transfer.sampler``), tokenizes the step's text with it, decomposes its vocabulary into
base pieces, predicts the whole vocabulary's embeddings with the hypernetwork and trains it on
the frozen LM's next-token loss with those embeddings, plus ``aux_weight`` times the auxiliary
loss that pulls tokens which are a single base token towards that token's embedding (squared
distance over the base embeddings' mean squared norm). Special tokens keep their base
embeddings. The sampled vocabulary is padded to a static size (its logits masked), so the step
compiles once.

The base LM is the trainer's frozen state (an argument of the step, sharded like the model);
only the hypernetwork trains. Batch ``k`` and its tokenizer are functions of (seed, k) alone, so
a resumed run draws exactly what the uninterrupted run would.

A run may start from exported weights instead of an initialisation (``init_from``, e.g. the
shipped hypernetwork): the optimizer starts afresh and the text stream goes on after the steps
those weights were trained for, so a run can be carried on from its export alone.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import random
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import PartitionSpec

from jaxtok.models.bert import BertConfig
from jaxtok.objectives import masked_sum, token_nll
from jaxtok.tokenization import TextTokenizer
from jaxtok.train.trainer import WEIGHT, OptimizerConfig, TrainTask
from jaxtok.transfer.api import EMBEDDING_SLOTS
from jaxtok.transfer.decompose import decompose
from jaxtok.transfer.hypernet import (
    WEIGHTS_FILE,
    HypernetConfig,
    embedding_stats,
    for_base,
    init_params,
    load_hypernet,
    predict,
    save_hypernet,
    shipped_hypernet,
)
from jaxtok.transfer.sampler import SamplerConfig, sample_tokenizer

_MASKED_LOGIT = -1e9
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hypernet-batches")


# ---------------------------------------------------------------------------------------------
# Batches: text, a sampled tokenizer, its decomposition


def vocab_capacity(sampler: SamplerConfig, num_special: int, multiple: int = 512) -> int:
    """The static size every sampled vocabulary is padded to."""
    return -(-(sampler.max_vocab + num_special) // multiple) * multiple


def special_strings(tokenizer: TextTokenizer) -> list[str]:
    added = tokenizer.hf.get_added_tokens_decoder()
    return [added[i].content for i in sorted(added) if added[i].special]


class HypernetBatches:
    """Step ``k``'s batch from a fixed text stream: ``rows`` rows of ``seq_len`` tokens under a
    tokenizer sampled from the text of steps ``k - queue .. k`` (``get_state``/``set_state`` hold
    only the step, which is all a resume needs)."""

    def __init__(self, documents: Sequence[str], base: TextTokenizer, hcfg: HypernetConfig,
                 sampler: SamplerConfig, *, rows: int, seq_len: int, queue: int, seed: int,
                 chars_per_token: int = 6, short_fraction: float = 0.625, short_width: int = 3,
                 sentences: bool = False):
        if not documents:
            raise ValueError("hypernetwork training needs at least one document")
        order = list(documents)
        random.Random(seed).shuffle(order)  # domains interleaved, the same order on every resume
        self.stream = "\n\n".join(order)
        self.base, self.hcfg, self.sampler = base, hcfg, sampler
        self.rows, self.seq_len, self.queue, self.seed = rows, seq_len, queue, seed
        self.row_chars = seq_len * chars_per_token
        self.specials = special_strings(base)
        self.capacity = vocab_capacity(sampler, len(self.specials))
        self.short = bucket_sizes(self.capacity, short_fraction, short_width)
        self.sentences = sentences  # rows for an encoder's distillation (:func:`sentence_rows`)
        self.step = 0

    def get_state(self) -> dict[str, int]:
        return {"step": self.step}

    def set_state(self, state: Mapping[str, int]) -> None:
        self.step = int(state["step"])
        self._ahead = None

    def __iter__(self):
        return self

    def texts(self, step: int) -> list[str]:
        """The ``rows`` texts of step ``step`` (consecutive windows of the stream, cycling)."""
        n = len(self.stream)
        start = (step * self.rows * self.row_chars) % n
        out = []
        for r in range(self.rows):
            a = (start + r * self.row_chars) % n
            piece = self.stream[a:a + self.row_chars]
            out.append(piece if len(piece) == self.row_chars else piece + self.stream[:self.row_chars - len(piece)])
        return out

    def __next__(self) -> dict[str, np.ndarray]:
        # the next step's batch (sampling, tokenizing, decomposing: ~1 s of host work) is built
        # in a thread while the device runs this one; batches depend on the step alone
        ahead = getattr(self, "_ahead", None)
        batch = ahead.result() if ahead is not None and ahead.step == self.step else self.batch(self.step)
        self.step += 1
        self._ahead = _POOL.submit(self.batch, self.step)
        self._ahead.step = self.step
        return batch

    def tokenizer(self, step: int):
        """Step ``step``'s sampled tokenizer (from its text and the queue's)."""
        history = [t for s in range(max(0, step - self.queue), step) for t in self.texts(s)]
        rng = np.random.default_rng([self.seed, step])
        return sample_tokenizer(self.texts(step) + history, rng, self.sampler, self.specials)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        texts = self.texts(step)
        tok = self.tokenizer(step)
        vocab, surface_bytes = vocabulary_arrays(tok, self.base, self.hcfg, self.capacity, self.short)
        rows = (sentence_rows(texts, tok, self.base, self.seq_len) if self.sentences
                else lm_rows(texts, tok, self.seq_len, surface_bytes))
        return {**vocab, **rows, "truncated": np.full((len(texts),), vocab.pop("truncated") / len(texts), np.float32)}


def bucket_sizes(capacity: int, short_fraction: float, short_width: int) -> tuple[int, int] | None:
    """(rows, width) of the short length bucket (see ``hypernet.predict``); None: no buckets."""
    if short_width < 1 or short_fraction <= 0:
        return None
    return int(capacity * short_fraction) // 8 * 8, short_width


def vocabulary_arrays(tok, base: TextTokenizer, hcfg: HypernetConfig, capacity: int,
                      short: tuple[int, int] | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``tok``'s vocabulary in base pieces, padded to ``capacity`` tokens, and each token's UTF-8
    byte count (0 for special tokens). ``order`` sorts the vocabulary by piece count for the
    length buckets ``short``; ``truncated`` counts the tokens the short bucket cuts."""
    if tok.get_vocab_size() > capacity:
        raise ValueError(f"sampled vocabulary {tok.get_vocab_size()} exceeds the capacity {capacity}")
    dec = decompose(base, tok, max_pieces=hcfg.max_pieces, require_chat_tokens=False)
    v = dec.num_new
    surface_bytes = np.array([0 if s else len(b) for b, s in zip(dec.new.surfaces, dec.new.special)], np.int32)
    pad = capacity - v
    pieces = np.pad(dec.pieces, ((0, pad), (0, hcfg.max_pieces - dec.pieces.shape[1])))
    piece_mask = np.pad(dec.mask, ((0, pad), (0, hcfg.max_pieces - dec.mask.shape[1])))
    single = np.where(dec.mask.sum(1) == 1, dec.overlap, -1)  # one base token with the same surface
    counts = piece_mask.sum(1)
    order = np.argsort(counts, kind="stable").astype(np.int32)
    truncated = int((counts[order[:short[0]]] > short[1]).sum()) if short else 0
    return {
        "order": order, "truncated": truncated,
        "pieces": pieces.astype(np.int32), "piece_mask": piece_mask,
        "copied": np.pad(dec.special, (0, pad), constant_values=-1).astype(np.int32),
        "single": np.pad(single, (0, pad), constant_values=-1).astype(np.int32),
        "valid": np.arange(capacity) < v,
    }, surface_bytes


def lm_rows(texts: Sequence[str], tok, seq_len: int, surface_bytes: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of ``seq_len`` (+1) tokens of ``texts`` under ``tok`` for next-token loss; ``num_bytes``
    counts the UTF-8 bytes of the scored (target) tokens."""
    rows = len(texts)
    tokens = np.zeros((rows, seq_len + 1), np.int32)
    valid = np.zeros((rows, seq_len + 1), bool)
    for r, enc in enumerate(tok.encode_batch(list(texts), add_special_tokens=False)):
        ids = enc.ids[:seq_len + 1]
        tokens[r, :len(ids)] = ids
        valid[r, :len(ids)] = True
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    loss_mask = (valid[:, :-1] & valid[:, 1:]).astype(np.int32)
    return {
        "tokens": inputs, "targets": targets, "loss_mask": loss_mask,
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
        "segment_ids": valid[:, :-1].astype(np.int32),
        "num_bytes": (surface_bytes[targets] * loss_mask).sum(1).astype(np.int32),
    }


def _cut(text: str, encodings, room: int) -> str:
    """``text`` up to where the first of ``encodings`` runs out of ``room`` tokens."""
    ends = [enc.offsets[room - 1][1] for enc in encodings if len(enc.ids) > room]
    return text[:min(ends)] if ends else text


def sentence_rows(texts: Sequence[str], tok, base: TextTokenizer, seq_len: int) -> dict[str, np.ndarray]:
    """The same text under ``tok`` and under the base tokenizer, ``[CLS] text [SEP]`` in at most
    ``seq_len`` tokens each: each text is cut where the first of the two would overflow, so the
    student and the teacher embed exactly the same characters."""
    cls, sep = (tok.token_to_id(base.hf.id_to_token(i)) for i in (base.bos_id, base.eos_id))
    if cls is None or sep is None:
        raise ValueError("the sampled tokenizer lacks the base's [CLS]/[SEP] tokens")
    room = seq_len - 2
    texts = [_cut(t, (tok.encode(t, add_special_tokens=False), base.hf.encode(t, add_special_tokens=False)), room)
             for t in texts]
    out = {name: np.zeros((len(texts), seq_len), np.int32) for name in ("tokens", "mask", "base_tokens", "base_mask")}
    for r, text in enumerate(texts):
        for prefix, ids, (first, last) in (
                ("", tok.encode(text, add_special_tokens=False).ids, (cls, sep)),
                ("base_", base.hf.encode(text, add_special_tokens=False).ids, (base.bos_id, base.eos_id))):
            row = [first, *ids[:room], last]
            out[f"{prefix}tokens"][r, :len(row)] = row
            out[f"{prefix}mask"][r, :len(row)] = 1
    return out


# ---------------------------------------------------------------------------------------------
# The task: hypernetwork parameters trained, the base LM frozen


def base_tables(lm_config: Any, lm_params: Mapping[str, Any]) -> dict[str, jax.Array]:
    names = EMBEDDING_SLOTS[type(lm_config)].names(lm_config)
    return {role: lm_params[key] for role, key in names.items()}


def predicted_matrices(hcfg: HypernetConfig, params, batch, tables, stats,
                       short: tuple[int, int] | None = None) -> dict[str, jax.Array]:
    """The batch vocabulary's embeddings: the hypernetwork's, special tokens copied from the base."""
    pred = predict(hcfg, params, batch["pieces"], batch["piece_mask"], tables, stats,
                   order=batch.get("order"), short=short)
    copied = batch["copied"]
    return {role: jnp.where((copied >= 0)[:, None], jnp.take(tables[role], jnp.maximum(copied, 0), axis=0),
                            m).astype(jnp.float32) for role, m in pred.items()}


def auxiliary_loss(pred: Mapping[str, jax.Array], tables: Mapping[str, jax.Array], single: jax.Array) -> jax.Array:
    """Mean squared distance, over the base embeddings' mean squared norm, between the predictions
    for tokens that are one base token (``single`` >= 0: its id) and that token's embeddings."""
    chosen = (single >= 0).astype(jnp.float32)
    aux = 0.0
    for role, m in pred.items():
        target = jnp.take(tables[role], jnp.maximum(single, 0), axis=0).astype(jnp.float32)
        mean_sq_norm = jnp.mean(jnp.sum(jnp.square(tables[role].astype(jnp.float32)), -1))
        aux = aux + jnp.sum(chosen * jnp.sum(jnp.square(m - target), -1)) / mean_sq_norm
    return aux / jnp.maximum(chosen.sum(), 1.0)


def hypernet_task(hcfg: HypernetConfig, lm_module: nn.Module, lm_axes: Any, aux_weight: float = 0.5,
                  seed: int = 0, short: tuple[int, int] | None = None) -> TrainTask:
    """A :class:`TrainTask` whose frozen state is ``{"lm": params, "stats": embedding_stats}``;
    ``short``: the length buckets the batches were sorted for (:func:`bucket_sizes`)."""
    lm_config = lm_module.config

    def init_fn(rng):
        return init_params(hcfg, jax.random.fold_in(rng, seed))

    def objective(params, batch, rng, frozen):
        del rng
        tables = base_tables(lm_config, frozen["lm"])
        pred = predicted_matrices(hcfg, params, batch, tables, frozen["stats"], short)
        out = lm_module.apply({"params": frozen["lm"]}, batch["tokens"], positions=batch["positions"],
                              segment_ids=batch["segment_ids"], input_embeddings=pred["input"],
                              output_embeddings=pred.get("output", pred["input"]))
        logits = jnp.where(batch["valid"][None, None, :], out.logits, _MASKED_LOGIT)
        nats = masked_sum(token_nll(logits, batch["targets"]), batch["loss_mask"])
        tokens = jnp.sum(batch["loss_mask"] > 0).astype(jnp.float32)
        aux = auxiliary_loss(pred, tables, batch["single"])
        lm_loss = nats / jnp.maximum(tokens, 1.0)
        metrics = {"nats": nats, "tokens": tokens, "bytes": jnp.sum(batch["num_bytes"]).astype(jnp.float32),
                   "aux_loss": aux * tokens, "truncated": jnp.sum(batch["truncated"]), WEIGHT: tokens}
        return lm_loss + aux_weight * aux, metrics

    stats_axes = {f"{role}_{kind}": PartitionSpec(None) for role in hcfg.roles for kind in ("mean", "std")}
    return TrainTask(init_fn=init_fn, objective=objective, frozen_axes={"lm": lm_axes, "stats": stats_axes})


def distill_task(hcfg: HypernetConfig, encoder: nn.Module, axes: Any, aux_weight: float = 0.5,
                 seed: int = 0, short: tuple[int, int] | None = None) -> TrainTask:
    """The encoder's objective (a sentence-embedding model has no LM head): the mean-pooled
    sentence embedding under the sampled tokenizer with predicted embeddings against the frozen
    model's own on the same text with its own tokenizer, ``(1 - cosine) + MSE`` (the MSE over
    the teacher vectors' mean squared norm, so both terms are scale-free), plus the auxiliary
    loss. Batches come from :func:`sentence_rows`; ``cosine`` is reported per row."""
    from jaxtok.models.bert import l2_normalize, mean_pool

    config = encoder.config

    def init_fn(rng):
        return init_params(hcfg, jax.random.fold_in(rng, seed))

    def embed(frozen, tokens, mask, words=None):
        out = encoder.apply({"params": frozen["lm"]}, tokens, mask, input_embeddings=words)
        return mean_pool(out.last_hidden, mask)

    def objective(params, batch, rng, frozen):
        del rng
        tables = base_tables(config, frozen["lm"])
        pred = predicted_matrices(hcfg, params, batch, tables, frozen["stats"], short)
        student = embed(frozen, batch["tokens"], batch["mask"], pred["input"])
        teacher = embed(frozen, batch["base_tokens"], batch["base_mask"])
        cosine = jnp.sum(l2_normalize(student) * l2_normalize(teacher), -1)
        mse = jnp.sum(jnp.square(student - teacher), -1) / jnp.mean(jnp.sum(jnp.square(teacher), -1))
        aux = auxiliary_loss(pred, tables, batch["single"])
        rows = jnp.asarray(cosine.shape[0], jnp.float32)
        metrics = {"cosine": jnp.sum(cosine), "mse": jnp.sum(mse), "aux_loss": aux * rows,
                   "truncated": jnp.sum(batch["truncated"]), WEIGHT: rows}
        return jnp.mean(1.0 - cosine) + jnp.mean(mse) + aux_weight * aux, metrics

    stats_axes = {f"{role}_{kind}": PartitionSpec(None) for role in hcfg.roles for kind in ("mean", "std")}
    return TrainTask(init_fn=init_fn, objective=objective, frozen_axes={"lm": axes, "stats": stats_axes})


def frozen_state(lm_config: Any, lm_params: Mapping[str, Any]) -> dict[str, Any]:
    return {"lm": lm_params, "stats": embedding_stats(base_tables(lm_config, lm_params))}


# ---------------------------------------------------------------------------------------------
# Experiments: presets, overrides, the run


@dataclasses.dataclass(frozen=True)
class HypernetExperiment:
    """A hypernetwork training run (``jaxtok train-hypernet``); nested sections are set as
    ``hypernet.d_model=384``, ``sampler.vocab_range=4096,8192``, ``optimizer.lr=1e-4``.

    Attributes:
      model: the frozen base LM (``load_pretrained_lm`` name); ``model_path`` a local copy.
      texts: ``default`` (the hypernetwork-training files of the fixed man-page split plus the
        stdlib's Python training split) or comma-separated text files.
      rows, seq_len: LM tokens per step = rows * seq_len, under the step's sampled tokenizer.
      queue: previous steps whose text joins the step's text for sampling the tokenizer.
      short_fraction, short_width: the short length bucket, that share of the padded vocabulary
        run with ``short_width`` piece slots (``hypernet.predict``); width 0 turns buckets off.
      eval_rows: held-out rows (evaluation files, one fixed sampled tokenizer) scored every
        ``eval_every`` steps, in bits per byte.
      init_from: a hypernetwork folder (``shipped``: the one shipped for ``model``) whose weights
        start a fresh run, the optimizer restarted (:func:`warm_start`); "" initialises.
    """

    name: str = "smollm2"
    model: str = "smollm2-135m"
    model_path: str | None = None
    run_dir: str = "runs/hypernet-smollm2"
    texts: str = "default"
    hypernet: HypernetConfig = HypernetConfig(embed_dim=0, d_model=256, n_layers=3, n_heads=4, chunk=2048,
                                              dtype="bfloat16")
    sampler: SamplerConfig = SamplerConfig(vocab_range=(4096, 8192))
    optimizer: OptimizerConfig = OptimizerConfig(lr=3e-4, warmup_steps=200, b1=0.9, b2=0.95, weight_decay=0.01,
                                                 clip_norm=0.1)
    rows: int = 4
    seq_len: int = 256
    queue: int = 4
    short_fraction: float = 0.625
    short_width: int = 3
    aux_weight: float = 0.5
    dtype: str = "bfloat16"
    steps: int = 20000
    eval_every: int = 100
    eval_rows: int = 8
    checkpoint_every: int = 100
    keep: int = 3
    seed: int = 0
    mesh: str = ""
    progress: bool = True
    init_from: str = ""

    def __post_init__(self):
        if min(self.rows, self.seq_len, self.steps) < 1 or self.queue < 0:
            raise ValueError("rows, seq_len and steps must be >= 1 and queue >= 0")


def minilm() -> HypernetExperiment:
    """MiniLM-L6 (an encoder) by distillation: sentence rows of 64 tokens, 16 a step."""
    return dataclasses.replace(
        HypernetExperiment(), name="minilm", model="minilm-l6", run_dir="runs/hypernet-minilm", rows=16,
        seq_len=64, eval_rows=64)


def smollm2() -> HypernetExperiment:
    """The real run for SmolLM2-135M on this CPU: ~1k LM tokens and a 4-8k vocabulary a step."""
    return HypernetExperiment()


def tiny() -> HypernetExperiment:
    """Seconds on a CPU (tests, notebooks): a small hypernetwork, short rows, a few steps."""
    return dataclasses.replace(
        HypernetExperiment(), name="tiny", run_dir="runs/hypernet-tiny",
        hypernet=HypernetConfig(embed_dim=0, d_model=64, n_layers=1, n_heads=4, chunk=512, dtype="float32"),
        sampler=SamplerConfig(vocab_range=(200, 400), max_len=8, max_word=16), rows=2, seq_len=32,
        queue=1, steps=4, eval_every=2, eval_rows=2, checkpoint_every=2, dtype="float32", progress=False)


PRESETS = {"smollm2": smollm2, "minilm": minilm, "tiny": tiny}


def get_experiment(name: str) -> HypernetExperiment:
    if name not in PRESETS:
        raise ValueError(f"unknown hypernetwork config {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]()


def apply_overrides(config: HypernetExperiment, items: Sequence[str]) -> HypernetExperiment:
    """``key=value`` overrides, ``section.field`` for the nested dataclasses; unknown keys are
    errors listing the valid ones."""
    import typing

    from jaxtok.train.configs import UnknownKeyError, parse_value

    sections = {f.name for f in dataclasses.fields(config) if dataclasses.is_dataclass(getattr(config, f.name))}
    valid = [f.name for f in dataclasses.fields(config) if f.name not in sections]
    valid += [f"{s}.{f.name}" for s in sections for f in dataclasses.fields(getattr(config, s))]
    top, nested = {}, {s: {} for s in sections}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in valid:
            raise UnknownKeyError(key, valid) if sep else ValueError(f"bad override {item!r}: expected key=value")
        section, _, field = key.rpartition(".")
        owner = type(getattr(config, section)) if section else type(config)
        value = parse_value(text.strip(), typing.get_type_hints(owner)[field], key)
        (nested[section] if section else top)[field] = value
    changes = {s: dataclasses.replace(getattr(config, s), **v) for s, v in nested.items() if v}
    return dataclasses.replace(config, **top, **changes)


def to_json(config: HypernetExperiment) -> dict[str, Any]:
    return dataclasses.asdict(config)


def default_documents(limit_code_bytes: int | None = None) -> list[str]:
    """The hypernetwork-training text: the man pages' ``hypernetwork`` files (German, Spanish,
    Italian; whatever is installed) and as many bytes of the stdlib's Python training split."""
    from jaxtok.data.manpages import manpage_split
    from jaxtok.data.sources import stdlib_documents

    multilingual = [text for _, text in manpage_split()["hypernetwork"]]
    budget = limit_code_bytes or max(sum(len(t.encode("utf-8")) for t in multilingual), 2_000_000)
    code, total = [], 0
    for doc in stdlib_documents("train"):
        if total >= budget:
            break
        code.append(doc)
        total += len(doc.encode("utf-8"))
    return multilingual + code


def evaluation_documents() -> list[str]:
    """Held-out text (man pages' ``evaluation`` files and the stdlib's validation split)."""
    from jaxtok.data.manpages import manpage_split
    from jaxtok.data.sources import stdlib_documents

    return [text for _, text in manpage_split()["evaluation"]] + list(stdlib_documents("validation"))


def read_documents(texts: str) -> list[str]:
    from pathlib import Path

    if texts == "default":
        return default_documents()
    paths = [Path(p.strip()) for p in texts.split(",") if p.strip()]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"text files not found: {', '.join(missing)}")
    return [p.read_text(encoding="utf-8") for p in paths]


def eval_data(config: HypernetExperiment, docs: Sequence[str], base: TextTokenizer, hcfg: HypernetConfig,
              sentences: bool = False) -> HypernetBatches:
    """The held-out rows' source: its step 0 (one fixed sampled tokenizer) is the run's yardstick."""
    return HypernetBatches(docs, base, hcfg, config.sampler, rows=config.eval_rows, seq_len=config.seq_len,
                           queue=0, seed=config.seed + 1_000_003, short_fraction=config.short_fraction,
                           short_width=config.short_width, sentences=sentences)


def eval_batches(config: HypernetExperiment, docs: Sequence[str], base: TextTokenizer,
                 hcfg: HypernetConfig, sentences: bool = False) -> list[dict[str, np.ndarray]]:
    """Fixed held-out rows under one fixed sampled tokenizer, in bits per byte (the encoder:
    cosine to the original sentence embeddings), in batches of ``config.rows``."""
    if config.eval_rows < 1 or not docs:
        return []
    batch = eval_data(config, docs, base, hcfg, sentences).batch(0)
    # rows of one batch per data-parallel chunk of ``rows``: same tokenizer for all of them
    return [{k: v[i:i + config.rows] if v.shape[0] == config.eval_rows else v for k, v in batch.items()}
            for i in range(0, config.eval_rows, config.rows)]


WARM_START_FILE = "warm_start.json"  # in the run dir: where a warm-started run's weights came from
ARCHITECTURE = ("embed_dim", "tied", "max_pieces", "d_model", "n_layers", "n_heads", "ff", "residual")


def warm_start(init_from: str, hcfg: HypernetConfig, model: str) -> tuple[dict, int, str]:
    """(float32 params, training steps behind them, folder) of the exported hypernetwork
    ``init_from`` (``shipped``: the one shipped for ``model``); a folder of another architecture
    or base model is refused, naming the differences."""
    from pathlib import Path

    folder = shipped_hypernet(model) if init_from == "shipped" else Path(init_from).absolute()
    if folder is None:
        raise FileNotFoundError(f"init_from=shipped: no hypernetwork is shipped for {model}")
    saved, params, meta = load_hypernet(folder)
    diff = [f"{k} {getattr(saved, k)} there, {getattr(hcfg, k)} here" for k in ARCHITECTURE
            if getattr(saved, k) != getattr(hcfg, k)]
    if diff:
        raise ValueError(f"{folder} does not fit this run's hypernetwork: {'; '.join(diff)}")
    if meta.get("base_model", model) != model:
        raise ValueError(f"{folder} was trained for {meta['base_model']}, not {model}")
    return params, int(meta.get("steps", 0)), str(folder)


def weights_digest(folder) -> str:
    """sha256 of a hypernetwork folder's weights file: which weights a warm start began from."""
    import hashlib
    from pathlib import Path

    with open(Path(folder) / WEIGHTS_FILE, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclasses.dataclass(frozen=True)
class HypernetRun:
    run_dir: Any
    state: Any
    summary: Mapping[str, float]
    weights: Any  # path of the exported safetensors folder


def run(config: HypernetExperiment, *, base: Any = None, resume: bool = False,
        devices: Sequence[Any] | None = None, documents: Sequence[str] | None = None,
        held_out: Sequence[str] | None = None, export_only: bool = False,
        export_step: int | None = None) -> HypernetRun:
    """Trains the hypernetwork of ``config`` in ``config.run_dir`` (checkpoints, metrics.jsonl,
    loss.png) and exports the final weights to ``run_dir/hypernet`` (see :func:`save_hypernet`).
    ``base``: an already loaded LM instead of ``config.model``; ``documents``/``held_out``: texts
    instead of ``config.texts`` and the default held-out files; ``export_only``: export the latest
    checkpoint's weights without training (a run still going, or one stopped early), or those of
    ``export_step``'s checkpoint."""
    from pathlib import Path

    from jaxtok.models.registry import load_pretrained_lm, module_for
    from jaxtok.sharding import make_mesh
    from jaxtok.train import flops
    from jaxtok.train.checkpoint import Checkpointer
    from jaxtok.train.observe import RunObserver, plot_metrics
    from jaxtok.train.pretrain import CHECKPOINT_DIR, METRICS_FILE, PLOT_FILE, _say, config_changes
    from jaxtok.train.trainer import LoopConfig, Trainer, fit

    run_dir = Path(config.run_dir).absolute()
    mesh = make_mesh(config.mesh or None, devices)
    if base is None:
        base = load_pretrained_lm(config.model, config.model_path, dtype=config.dtype, param_dtype="float32")
    lm_config = dataclasses.replace(base.config, dtype=config.dtype)
    lm_module = module_for(lm_config)
    tables = base_tables(lm_config, base.params)
    hcfg = for_base(config.hypernet, tables)
    lm_axes = nn.get_partition_spec(jax.eval_shape(
        lambda: lm_module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]))
    docs = list(documents) if documents is not None else read_documents(config.texts)
    encoder = isinstance(lm_config, BertConfig)  # trained by distillation (no LM head)
    data = HypernetBatches(docs, base.tokenizer, hcfg, config.sampler, rows=config.rows, seq_len=config.seq_len,
                           queue=config.queue, seed=config.seed, short_fraction=config.short_fraction,
                           short_width=config.short_width, sentences=encoder)
    make_task = distill_task if encoder else hypernet_task
    task = make_task(hcfg, lm_module, lm_axes, config.aux_weight, config.seed, data.short)
    trainer = Trainer(task, config.optimizer, mesh, total_steps=config.steps, seed=config.seed)
    trainer.set_frozen(frozen_state(lm_config, base.params))
    held = list(held_out) if held_out is not None else evaluation_documents()
    evals = eval_batches(config, held, base.tokenizer, hcfg, encoder) if config.eval_every else []
    n_params = sum(x.size for x in jax.tree.leaves(trainer.abstract_state.params))
    _say(f"hypernetwork {n_params / 1e6:.2f} M params for {config.model} (D {hcfg.embed_dim}, tied {hcfg.tied}); "
         f"{len(docs)} documents, {len(evals)} eval batches, sampled vocabularies padded to {data.capacity}")
    loop = LoopConfig(steps=config.steps, eval_every=config.eval_every, checkpoint_every=config.checkpoint_every)
    saved_config = json.loads(json.dumps(to_json(config)))  # as a checkpoint gives it back (tuples as lists)
    with Checkpointer(run_dir / CHECKPOINT_DIR, keep=config.keep, config=saved_config) as checkpointer:
        latest = checkpointer.latest_step()
        if latest is not None and not resume:
            raise ValueError(f"{checkpointer.directory} already holds checkpoints (latest step {latest}); "
                             "pass --resume to continue that run, or choose another --run-dir")
        if export_step is not None:
            if not export_only:
                raise ValueError("export_step is for export_only (training always continues from the latest step)")
            if export_step not in checkpointer.all_steps():
                raise FileNotFoundError(f"{checkpointer.directory}: no checkpoint of step {export_step} "
                                        f"(saved: {checkpointer.all_steps()})")
            restored = checkpointer.restore(export_step, trainer.abstract_state)
        else:
            restored = checkpointer.restore_latest(trainer.abstract_state) if resume else None
        if restored is not None:
            # init_from only starts a run: a resumed one goes on from its checkpoint either way
            changes = [c for c in config_changes(restored.config, saved_config) if not c.startswith("init_from:")]
            if changes:
                _say("warning: the config differs from the checkpoint's: " + "; ".join(changes))
            if config.init_from:
                _say(f"init_from={config.init_from} ignored: the run goes on from its checkpoint")
            data.set_state(restored.data_state)
            state = restored.state
            _say(f"resumed from step {restored.step} ({checkpointer.directory})")
        elif export_only:
            raise FileNotFoundError(f"{checkpointer.directory}: no checkpoint to export")
        else:
            params = None
            if config.init_from:
                params, done, source = warm_start(config.init_from, hcfg, config.model)
                data.set_state({"step": done})  # the text the source run would have read next
                _say(f"warm start from {source} ({done} steps; optimizer restarted)")
            if jax.process_index() == 0:  # a fresh start: an earlier attempt's record goes
                (run_dir / WARM_START_FILE).unlink(missing_ok=True)
                if config.init_from:
                    run_dir.mkdir(parents=True, exist_ok=True)
                    tmp = run_dir / (WARM_START_FILE + ".tmp")
                    tmp.write_text(json.dumps({"from": source, "steps": done,
                                               "sha256": weights_digest(source)}, indent=1))
                    tmp.replace(run_dir / WARM_START_FILE)
            state = trainer.init_state(jax.random.key(config.seed), params)
        # model FLOPs of a step: the frozen LM's forward + backward to the embeddings, the
        # hypernetwork's over the padded vocabulary (counted per LM token)
        tokens_per_step = config.rows * config.seq_len
        # the encoder: the student's forward and backward and the teacher's forward (8N a token)
        d, f = lm_config.d_model, lm_config.d_ff
        lm_flops = (8 * lm_config.n_layers * (4 * d * d + 2 * d * f) if encoder
                    else flops.model_flops_per_token(lm_config, config.seq_len))
        slots = data.capacity * hcfg.max_pieces if data.short is None else (
            data.short[0] * data.short[1] + (data.capacity - data.short[0]) * hcfg.max_pieces)
        hn_flops = 6 * n_params * slots / tokens_per_step
        try:
            peak = flops.peak_flops(config.dtype, mesh.devices.flat[0]).flops_per_s
        except ValueError:
            peak = None
        summary = {}
        if not export_only:
            try:
                with RunObserver(run_dir, total_steps=config.steps, start_step=int(jax.device_get(state.step)),
                                 tokens_per_step=tokens_per_step, flops_per_token=lm_flops + hn_flops,
                                 peak_flops=peak, progress=config.progress) as observer:
                    state = fit(trainer, state, data, loop, eval_batches=evals, checkpointer=checkpointer,
                                observer=observer)
                    summary = observer.summary()
            finally:
                if jax.process_index() == 0:
                    plot_metrics(run_dir / METRICS_FILE, run_dir / PLOT_FILE)
    weights = save_hypernet(run_dir / "hypernet", hcfg, jax.device_get(state.params),
                            # steps: of training behind the weights, a warm start's source's included
                            {"base_model": config.model, "steps": int(data.get_state()["step"]),
                             "experiment": saved_config}, overwrite=True)
    _say(f"hypernetwork weights: {weights}")
    return HypernetRun(run_dir=run_dir, state=state, summary=summary, weights=weights)
