"""Training-free initialisations of a new vocabulary's embeddings.

A method is ``prepare`` (host work that needs no gradients: train fastText, read a donor model,
embed token strings with an auxiliary encoder) and ``apply``, a pure function

    apply(base: {"input": (V_base, D)[, "output": (V_base, D)]}, decomposition, aux, options)
        -> {"input": (V_new, D)[, "output": (V_new, D)]}

of jnp ops over the padded decomposition arrays, jit-compiled and mapped over chunks of the new
vocabulary (memory stays O(chunk * P * D)). Under a mesh the results are constrained to the
``vocab`` axis. Every method copies special tokens mapped by role; all but ``mean`` also copy
the exact overlap. A hypernetwork is one more entry of ``METHODS``.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtok.sharding import constrain
from jaxtok.transfer.decompose import Decomposition, TransferError
from jaxtok.transfer.hypernet import HypernetOptions, hypernet_apply, hypernet_prepare

Matrices = dict[str, jax.Array]
CHUNK = 512  # new tokens per mapped step


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _chunked(fn: Callable[..., jax.Array], *rows: jax.Array, chunk: int = CHUNK) -> jax.Array:
    """``fn`` over row chunks of ``rows`` (all with the same leading size) with ``lax.map``."""
    n = rows[0].shape[0]
    chunk = max(1, min(chunk, n))
    padded = -(-n // chunk) * chunk

    def pad(x):
        x = jnp.pad(x, [(0, padded - n)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(padded // chunk, chunk, *x.shape[1:])

    out = jax.lax.map(lambda args: fn(*args), tuple(pad(r) for r in rows))
    return out.reshape(padded, *out.shape[2:])[:n]


@jax.jit
def copy_rows(new: jax.Array, table: jax.Array, ids: jax.Array) -> jax.Array:
    """``new`` with row v replaced by ``table[ids[v]]`` wherever ``ids[v] >= 0``."""
    ids = jnp.asarray(ids)
    taken = jnp.take(table, jnp.maximum(ids, 0), axis=0).astype(new.dtype)
    return jnp.where((ids >= 0)[:, None], taken, new)


def _vocab_sharded(x: jax.Array) -> jax.Array:
    return constrain(x, ("vocab", "embed"))


@jax.jit
def piece_mean(table: jax.Array, pieces: jax.Array, mask: jax.Array) -> jax.Array:
    """(V_new, D) mean of each token's piece embeddings; the vocabulary mean for no pieces."""
    fallback = table.mean(axis=0)

    def one(p, m):
        w = m.astype(table.dtype)  # (C, P)
        total = jnp.einsum("cp,cpd->cd", w, jnp.take(table, p, axis=0))
        count = w.sum(axis=1, keepdims=True)
        return jnp.where(count > 0, total / jnp.maximum(count, 1), fallback)

    return _chunked(one, pieces, mask)


def sparsemax(z: jax.Array, axis: int = -1) -> jax.Array:
    """Euclidean projection of ``z`` onto the probability simplex (Martins & Astudillo, 2016):
    p = max(z - tau, 0) with tau chosen so that sum(p) = 1; exact zeros where z is small."""
    z = jnp.moveaxis(z, axis, -1)
    z_sorted = -jnp.sort(-z, axis=-1)
    k = jnp.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    cumsum = jnp.cumsum(z_sorted, axis=-1)
    support = (1 + k * z_sorted > cumsum)
    k_z = jnp.sum(support, axis=-1, keepdims=True)
    tau = (jnp.take_along_axis(cumsum, k_z - 1, axis=-1) - 1) / k_z.astype(z.dtype)
    return jnp.moveaxis(jnp.maximum(z - tau, 0), -1, axis)


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------
# mean and FVT


@dataclasses.dataclass(frozen=True)
class NoOptions:
    pass


def mean_apply(base: Mapping[str, jax.Array], dec: Decomposition, aux: Mapping[str, Any],
               options: NoOptions) -> Matrices:
    """Every new token gets the mean of the base embeddings, E'[v] = (1/|V|) sum_u E[u]: the
    floor any method should beat (e.g. Hewitt, 2021, "Initializing new word embeddings").
    Special tokens mapped by role are still copied."""
    out = {}
    for name, table in base.items():
        mean = jnp.broadcast_to(table.mean(axis=0), (dec.num_new, table.shape[1]))
        out[name] = _vocab_sharded(copy_rows(mean, table, dec.special))
    return out


def fvt_apply(base: Mapping[str, jax.Array], dec: Decomposition, aux: Mapping[str, Any],
              options: NoOptions) -> Matrices:
    """Fast Vocabulary Transfer (Gee et al., 2022): a token with the same surface in both
    vocabularies keeps its embedding; any other is the mean of its base pieces,
    E'[v] = (1/n) sum_j E[p_j] for v = p_1 ... p_n under the base tokenizer."""
    pieces, mask = jnp.asarray(dec.pieces), jnp.asarray(dec.mask)
    return {name: _vocab_sharded(copy_rows(piece_mean(table, pieces, mask), table, dec.copied))
            for name, table in base.items()}


# ---------------------------------------------------------------------------------------------
# FOCUS


@dataclasses.dataclass(frozen=True)
class FocusOptions:
    """dim/epochs/min_count: the fastText CBOW model (deepfocus's defaults); seed: its training
    and the N(mean, std) draws for tokens without a vector."""

    dim: int = 100
    epochs: int = 3
    min_count: int = 10
    seed: int = 42


def fasttext_vectors(tokenizer, texts: Sequence[str], options: FocusOptions) -> tuple[np.ndarray, np.ndarray]:
    """(V, dim) fastText CBOW vectors of every token of ``tokenizer`` (a ``tokenizers.Tokenizer``)
    trained on ``texts`` tokenized by it (one sentence per line, as deepfocus does), and (V,)
    whether the token occurred at least ``min_count`` times (others have no vector)."""
    from gensim.models import FastText

    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    sentences = [e.tokens for e in tokenizer.encode_batch(lines, add_special_tokens=False)]
    if not sentences:
        raise TransferError("focus needs target-domain text to train fastText on (--text FILE)")
    # one worker: gensim's result then depends only on the seed
    model = FastText(sentences=sentences, vector_size=options.dim, sg=0, min_count=options.min_count,
                     epochs=options.epochs, workers=1, seed=options.seed)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    vectors = np.zeros((size, options.dim), np.float32)
    has = np.zeros(size, bool)
    for i in range(size):  # host bookkeeping over token strings, not over model embeddings
        token = tokenizer.id_to_token(i)
        if token in model.wv.key_to_index:
            vectors[i], has[i] = model.wv[token], True
    return vectors, has


def focus_prepare(ctx: MethodContext, dec: Decomposition, options: FocusOptions) -> dict[str, Any]:
    if "vectors" in ctx.aux:
        vectors, has = np.asarray(ctx.aux["vectors"]), np.asarray(ctx.aux["has_vector"])
    else:
        if not ctx.texts:
            raise TransferError("focus needs target-domain text for its fastText model (--text FILE)")
        vectors, has = fasttext_vectors(ctx.new.hf, ctx.texts, options)
    if vectors.shape[0] != dec.num_new:
        raise TransferError(f"focus: {vectors.shape[0]} auxiliary vectors for {dec.num_new} new tokens")
    return {"vectors": vectors, "has_vector": has}


@jax.jit
def _focus_rows(unit: jax.Array, anchor_unit: jax.Array, anchor_rows: jax.Array) -> jax.Array:
    """(V, D): sparsemax(cos(x_v, x_o)) over anchors o, times their embeddings, per chunk."""

    def combine(x):
        weights = sparsemax(x @ anchor_unit.T)  # (C, |O|)
        return weights.astype(anchor_rows.dtype) @ anchor_rows

    return _chunked(combine, unit)


def focus_apply(base: Mapping[str, jax.Array], dec: Decomposition, aux: Mapping[str, Any],
                options: FocusOptions) -> Matrices:
    """FOCUS (Dobler & de Melo, 2023; reference code: the ``deepfocus`` package). Overlapping
    tokens O are copied; another token v with an auxiliary vector x_v becomes the convex
    combination E'[v] = sum_{o in O} w_o E[o], w = sparsemax_o(cos(x_v, x_o)), over the
    overlapping tokens that have an auxiliary vector. x: fastText CBOW (dim 100) trained on
    target text tokenized with the new tokenizer. Tokens without a vector are drawn from
    N(mean, std) of the base embeddings (per dimension)."""
    vectors, has = np.asarray(aux["vectors"], np.float32), np.asarray(aux["has_vector"], bool)
    anchors = np.flatnonzero((dec.overlap >= 0) & has)  # new ids
    if anchors.size == 0:
        raise TransferError("focus: no overlapping token has an auxiliary vector (more target text, "
                            "or a lower --option min_count=...)")
    unit = _unit(jnp.asarray(vectors))
    anchor_unit = unit[anchors]
    anchor_base = jnp.asarray(dec.overlap[anchors])
    key = jax.random.key(options.seed)
    out = {}
    for name, table in base.items():
        new = _focus_rows(unit, anchor_unit, jnp.take(table, anchor_base, axis=0))
        draws = table.mean(0) + table.std(0) * jax.random.normal(key, new.shape, table.dtype)
        new = jnp.where(jnp.asarray(has)[:, None], new, draws)
        out[name] = _vocab_sharded(copy_rows(new, table, dec.copied))
    return out


# ---------------------------------------------------------------------------------------------
# OMP


@dataclasses.dataclass(frozen=True)
class OmpOptions:
    """k: atoms per token (mergekit's default 64; capped at the donor width and the number of
    shared tokens); chunk: tokens per batched solve."""

    k: int = 64
    chunk: int = 256


def omp(targets: jax.Array, atoms: jax.Array, k: int, eps: float = 1e-8) -> tuple[jax.Array, jax.Array]:
    """Batched orthogonal matching pursuit: for each row of ``targets`` (B, D), ``k`` rows of
    ``atoms`` (N, D) and coefficients c (B, k) with targets ~= sum_i c_i atoms[idx_i].

    Each step picks the atom most correlated with the residual (by cosine: OMP assumes unit
    atoms; the coefficients are for the atoms as given), extends a QR factorisation of the
    chosen atoms by Gram-Schmidt (twice, for orthogonality in float32) and projects the target
    on their span; the coefficients solve R c = Q^T target at the end (as mergekit's
    ``batch_omp``)."""
    b, d = targets.shape
    unit_atoms = _unit(atoms)
    q = jnp.zeros((b, d, k), targets.dtype)
    r = jnp.zeros((b, k, k), targets.dtype)
    idx = jnp.zeros((b, k), jnp.int32)
    chosen = jnp.zeros((b, atoms.shape[0]), bool)

    def step(t, carry):
        q, r, idx, chosen, resid = carry
        corr = jnp.where(chosen, -jnp.inf, jnp.abs(resid @ unit_atoms.T))
        j = jnp.argmax(corr, axis=1).astype(jnp.int32)
        atom = atoms[j]  # (B, D)
        proj = jnp.einsum("bdk,bd->bk", q, atom)
        vec = atom - jnp.einsum("bdk,bk->bd", q, proj)
        proj2 = jnp.einsum("bdk,bd->bk", q, vec)  # second Gram-Schmidt pass
        vec = vec - jnp.einsum("bdk,bk->bd", q, proj2)
        norm = jnp.maximum(jnp.linalg.norm(vec, axis=1), eps)
        q = q.at[:, :, t].set(vec / norm[:, None])
        r = r.at[:, :, t].set(proj + proj2).at[:, t, t].set(norm)
        idx = idx.at[:, t].set(j)
        chosen = chosen.at[jnp.arange(b), j].set(True)
        resid = targets - jnp.einsum("bdk,bk->bd", q, jnp.einsum("bdk,bd->bk", q, targets))
        return q, r, idx, chosen, resid

    q, r, idx, chosen, _ = jax.lax.fori_loop(0, k, step, (q, r, idx, chosen, targets))
    rhs = jnp.einsum("bdk,bd->bk", q, targets)[..., None]
    coef = jax.scipy.linalg.solve_triangular(r, rhs, lower=False)[..., 0]
    return idx, coef


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _omp_rows(targets: jax.Array, atoms: jax.Array, shared_base: jax.Array, *, k: int, chunk: int) -> jax.Array:
    """(V, D): each target's OMP coefficients over ``atoms`` applied to ``shared_base``."""

    def solve(rows):
        idx, coef = omp(rows.astype(jnp.float32), atoms.astype(jnp.float32), k)
        return jnp.einsum("bk,bkd->bd", coef, jnp.take(shared_base, idx, axis=0).astype(jnp.float32))

    return _chunked(solve, targets, chunk=chunk)


def omp_prepare(ctx: MethodContext, dec: Decomposition, options: OmpOptions) -> dict[str, Any]:
    if "donor" in ctx.aux:
        return {"donor": ctx.aux["donor"]}
    if ctx.donor is None:
        raise TransferError("omp needs a donor model that uses the new tokenizer (--donor RUN_DIR or folder)")
    from jaxtok.transfer.api import embedding_matrices

    donor_contents = tuple(ctx.donor.tokenizer.hf.id_to_token(i) or "" for i in range(dec.num_new))
    if ctx.donor.tokenizer.vocab_size != dec.num_new or donor_contents != dec.new.contents:
        raise TransferError(f"the donor's tokenizer ({ctx.donor.tokenizer.vocab_size} tokens) is not the new "
                            f"tokenizer ({dec.num_new} tokens): OMP needs a donor trained with it")
    donor = embedding_matrices(ctx.donor.config, ctx.donor.params)
    return {"donor": {name: np.asarray(m, np.float32)[:dec.num_new] for name, m in donor.items()}}


def omp_apply(base: Mapping[str, jax.Array], dec: Decomposition, aux: Mapping[str, Any],
              options: OmpOptions) -> Matrices:
    """Orthogonal matching pursuit (Goddard & Neto, 2025; mergekit ``tokensurgeon``). In a donor
    model that natively uses the new tokenizer, each new token's embedding d_v is approximated
    as d_v ~= sum_i c_i d_{s_i} over k shared tokens s_i (same surface in both vocabularies);
    the same coefficients then give E'[v] = sum_i c_i E[s_i] in the base model. Shared tokens
    are copied. A base output matrix uses the donor's output matrix (its input one when tied)."""
    shared = np.flatnonzero(dec.overlap >= 0)  # new ids that the base also has
    donor = {name: jnp.asarray(m) for name, m in aux["donor"].items()}
    out = {}
    for name, table in base.items():
        donor_table = donor.get(name, donor["input"])
        k = max(1, min(options.k, len(shared), donor_table.shape[1]))
        shared_base = jnp.take(table, jnp.asarray(dec.overlap[shared]), axis=0)
        new = _omp_rows(donor_table, donor_table[shared], shared_base, k=k, chunk=options.chunk)
        new = new.astype(table.dtype)
        out[name] = _vocab_sharded(copy_rows(new, table, dec.copied))
    return out


# ---------------------------------------------------------------------------------------------
# TokenAdapt


@dataclasses.dataclass(frozen=True)
class TokenAdaptOptions:
    """k / temperature: the global estimate's neighbours and softmax temperature;
    local_temperature: the local estimate's; w: weight of the global estimate (TokenAdapt's 0.3s)."""

    k: int = 3
    temperature: float = 0.3
    local_temperature: float = 0.3
    w: float = 0.3
    batch_size: int = 256


def token_texts(surfaces: Sequence[bytes]) -> list[str]:
    """What an auxiliary text encoder sees of a token: its surface as text, word-start space off."""
    return [s.decode("utf-8", errors="replace").strip() or s.decode("utf-8", errors="replace") for s in surfaces]


def minilm_embedder(batch_size: int = 256) -> Callable[[Sequence[str]], np.ndarray]:
    """all-MiniLM-L6-v2 sentence embeddings through jaxtok's own BERT (the TokenAdapt embedder)."""
    from jaxtok.io.safetensors_io import load_minilm

    config, params, tokenizer = load_minilm()
    return bert_embedder(config, params, tokenizer, batch_size)


def bert_embedder(config, params, tokenizer, batch_size: int = 256, max_len: int = 8):
    """Unit sentence vectors of short texts from a jaxtok BERT (cut at ``max_len`` tokens with
    [CLS]/[SEP]: token strings are a few word pieces long)."""
    from jaxtok.models.bert import sentence_embedding

    embed = jax.jit(functools.partial(sentence_embedding, config))

    def run(texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            rows = [e.ids[:max_len] for e in tokenizer.encode_batch(list(texts[start:start + batch_size]))]
            ids = np.zeros((batch_size, max_len), np.int32)
            mask = np.zeros((batch_size, max_len), np.int32)
            for i, row in enumerate(rows):
                ids[i, :len(row)], mask[i, :len(row)] = row, 1
            out.append(np.asarray(embed(params, jnp.asarray(ids), jnp.asarray(mask)))[:len(rows)])
        return np.concatenate(out) if out else np.zeros((0, config.d_model), np.float32)

    return run


def tokenadapt_prepare(ctx: MethodContext, dec: Decomposition, options: TokenAdaptOptions) -> dict[str, Any]:
    if "new_vectors" in ctx.aux:
        new_vec, base_vec = ctx.aux["new_vectors"], ctx.aux["base_vectors"]
    else:
        embedder = ctx.embedder or minilm_embedder(options.batch_size)
        new_vec, base_vec = embedder(token_texts(dec.new.surfaces)), embedder(token_texts(dec.base.surfaces))

    def lengths(surfaces):  # characters of the token without its word-start space
        return np.array([len(s.lstrip(b" ").decode("utf-8", errors="replace")) for s in surfaces], np.float32)

    # a token that is only a space has length 0: its pieces' ratio is taken against 1
    return {"new_vectors": np.asarray(new_vec, np.float32), "base_vectors": np.asarray(base_vec, np.float32),
            "new_len": np.maximum(lengths(dec.new.surfaces), 1), "base_len": lengths(dec.base.surfaces)}


@functools.partial(jax.jit, static_argnames=("k", "temperature", "local_temperature", "w"))
def _tokenadapt_rows(table, new_vec, base_vec, new_len, base_len, base_special, pieces, mask, *, k: int,
                     temperature: float, local_temperature: float, w: float) -> jax.Array:
    """(V_new, D) TokenAdapt estimates, chunk by chunk (see ``tokenadapt_apply``)."""

    def estimate(vec, length, p, m):
        cos = jnp.einsum("ca,cpa->cp", vec, jnp.take(base_vec, p, axis=0))
        a = jax.nn.softmax(jnp.where(m, cos, -jnp.inf), axis=-1)
        ratio = jnp.take(base_len, p) / length[:, None]
        weights = jax.nn.softmax(jnp.where(m, (a + ratio) / 2 / local_temperature, -jnp.inf), axis=-1)
        weights = jnp.where(m, weights, 0.0)  # rows without pieces: softmax of all -inf is nan
        local = jnp.einsum("cp,cpd->cd", weights.astype(table.dtype), jnp.take(table, p, axis=0))
        sims = jnp.where(base_special[None], -jnp.inf, vec @ base_vec.T)  # (C, V_base)
        top, top_ids = jax.lax.top_k(sims, k)
        g = jax.nn.softmax(top / temperature, axis=-1)
        glob = jnp.einsum("ck,ckd->cd", g.astype(table.dtype), jnp.take(table, top_ids, axis=0))
        has_pieces = m.any(axis=1, keepdims=True)
        return jnp.where(has_pieces, (1 - w) * local + w * glob, glob)

    return _chunked(estimate, new_vec, new_len, pieces, mask)


def tokenadapt_apply(base: Mapping[str, jax.Array], dec: Decomposition, aux: Mapping[str, Any],
                     options: TokenAdaptOptions) -> Matrices:
    """TokenAdapt's hybrid (Sharthak et al., 2025). With φ an auxiliary text embedding
    (all-MiniLM-L6-v2) and s = p_1 ... p_n the token under the base tokenizer:
    local = sum_j w_j E[p_j], a_j = softmax_j cos(φ(s), φ(p_j)),
    w_j = softmax_j(((a_j + len(p_j)/len(s)) / 2) / τ_local);
    global = sum_{u in top-k} softmax_u(cos(φ(s), φ(u)) / τ) E[u] over the k base tokens most
    similar to s; E'[s] = (1 - w) local + w global (k 3, τ 0.3, w 0.3). Overlap copied; a token
    without pieces uses the global estimate alone."""
    new_vec = _unit(jnp.asarray(aux["new_vectors"]))
    base_vec = _unit(jnp.asarray(aux["base_vectors"]))
    new_len, base_len = jnp.asarray(aux["new_len"]), jnp.asarray(aux["base_len"])
    base_special = jnp.asarray(dec.base.special)
    k = min(options.k, base_vec.shape[0])
    pieces, mask = jnp.asarray(dec.pieces), jnp.asarray(dec.mask)
    out = {}
    for name, table in base.items():
        new = _tokenadapt_rows(table, new_vec, base_vec, new_len, base_len, base_special, pieces, mask, k=k,
                               temperature=options.temperature, local_temperature=options.local_temperature,
                               w=options.w)
        out[name] = _vocab_sharded(copy_rows(new, table, dec.copied))
    return out


# ---------------------------------------------------------------------------------------------
# The table of methods and their options


@dataclasses.dataclass(frozen=True)
class MethodContext:
    """What ``prepare`` may use: the base and new tokenizers, target-domain ``texts`` (focus), a
    ``donor`` LM (omp), an ``embedder`` (tokenadapt; texts -> vectors), precomputed ``aux``
    arrays that skip the host work (tests and the deepfocus comparison feed vectors this way),
    and the base model's name (hypernet: which shipped weights fit it)."""

    base: Any
    new: Any
    texts: Sequence[str] | None = None
    donor: Any = None
    embedder: Callable[[Sequence[str]], np.ndarray] | None = None
    aux: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    base_name: str | None = None


def _no_prepare(ctx, dec, options) -> dict[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    options_cls: type
    apply: Callable[[Mapping[str, jax.Array], Decomposition, Mapping[str, Any], Any], Matrices]
    prepare: Callable[[MethodContext, Decomposition, Any], dict[str, Any]] = _no_prepare


METHODS: dict[str, Method] = {
    "mean": Method("mean", NoOptions, mean_apply),
    "fvt": Method("fvt", NoOptions, fvt_apply),
    "focus": Method("focus", FocusOptions, focus_apply, focus_prepare),
    "omp": Method("omp", OmpOptions, omp_apply, omp_prepare),
    "tokenadapt": Method("tokenadapt", TokenAdaptOptions, tokenadapt_apply, tokenadapt_prepare),
    "hypernet": Method("hypernet", HypernetOptions, hypernet_apply, hypernet_prepare),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise TransferError(f"unknown transfer method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


def parse_options(method: str, items: Sequence[str] | Mapping[str, Any] = ()) -> Any:
    """The options dataclass of ``method`` from ``key=value`` strings (or a mapping); unknown
    keys and unreadable values are errors that name the key."""
    cls = get_method(method).options_cls
    hints = typing.get_type_hints(cls)
    pairs = items.items() if isinstance(items, Mapping) else [_split(item) for item in items]
    values = {}
    for key, value in pairs:
        if key not in hints:
            valid = ", ".join(sorted(hints)) or "none"
            raise TransferError(f"unknown option {key!r} for method {method!r}; valid options: {valid}")
        values[key] = _convert(value, hints[key], key)
    return cls(**values)


def _split(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise TransferError(f"bad option {item!r}: expected key=value")
    return key.strip(), value.strip()


def _convert(value: Any, hint: type, key: str) -> Any:
    if not isinstance(value, str):
        return hint(value)
    try:
        if hint is int:
            return int(value)
        if hint is float:
            return float(value)
    except ValueError:
        raise TransferError(f"option {key}: expected {hint.__name__}, got {value!r}") from None
    if hint is bool:
        if value.lower() not in _BOOLS:
            raise TransferError(f"option {key}: expected true or false, got {value!r}")
        return _BOOLS[value.lower()]
    return value


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def options_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options)
