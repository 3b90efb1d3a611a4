"""The five training-free methods on a tiny Llama and tiny tokenizers, each against a hand-written
twin; FOCUS also against the ``deepfocus`` package."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _transfer_models import GERMAN, german_tokenizer, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxtok.models.llama import Llama
from jaxtok.transfer import TransferError, decompose, parse_options, transfer
from jaxtok.transfer.methods import omp, sparsemax


@pytest.fixture(scope="module")
def base():
    return tiny_llama(tie=False)


@pytest.fixture(scope="module")
def dec(base):
    return decompose(base.tokenizer, german_tokenizer())


def random_aux(dec, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    has = rng.random(dec.num_new) > 0.2
    return {"vectors": rng.normal(size=(dec.num_new, dim)).astype(np.float32), "has_vector": has}


def tokenadapt_aux(dec, seed=0):
    rng = np.random.default_rng(seed)
    return {"new_vectors": rng.normal(size=(dec.num_new, 6)).astype(np.float32),
            "base_vectors": rng.normal(size=(dec.base.size, 6)).astype(np.float32)}


def donor_aux(dec, seed=0):
    rng = np.random.default_rng(seed)
    return {"donor": {"input": rng.normal(size=(dec.num_new, 24)).astype(np.float32)}}


AUX = {"mean": lambda d: {}, "fvt": lambda d: {}, "focus": random_aux, "omp": donor_aux,
       "tokenadapt": tokenadapt_aux}


def run(base, method, dec, aux=None, options=()):
    return transfer(base, german_tokenizer(), method, options, aux=AUX[method](dec) if aux is None else aux,
                    decomposition=dec)


@pytest.mark.parametrize("method", ["fvt", "focus", "omp", "tokenadapt"])
def test_overlap_and_specials_copied_exactly(base, dec, method):
    out = run(base, method, dec)
    rows = np.flatnonzero(dec.copied >= 0)
    assert rows.size > 256
    for name, key in (("input", "embedding"), ("output", "lm_head")):
        new, old = np.asarray(out.params[key]), np.asarray(base.params[key])
        assert new.shape == (dec.num_new, base.config.d_model)
        np.testing.assert_array_equal(new[rows], old[dec.copied[rows]], err_msg=f"{method} {name}")
    assert out.config.vocab_size == dec.num_new


def test_mean_is_the_vocabulary_mean(base, dec):
    out = run(base, "mean", dec)
    table = np.asarray(base.params["embedding"])
    plain = np.flatnonzero(dec.special < 0)
    np.testing.assert_allclose(np.asarray(out.params["embedding"])[plain],
                               np.broadcast_to(table.mean(0), (plain.size, table.shape[1])), rtol=1e-5, atol=1e-7)


def test_fvt_is_the_mean_of_the_pieces(base, dec):
    out = np.asarray(run(base, "fvt", dec).params["lm_head"])
    table = np.asarray(base.params["lm_head"])
    rows = np.flatnonzero(dec.copied < 0)
    assert rows.size > 10
    for row in rows:  # the plain twin: a Python mean over the listed pieces
        pieces = [int(p) for p, m in zip(dec.pieces[row], dec.mask[row]) if m]
        np.testing.assert_allclose(out[row], table[pieces].mean(0), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def own():
    """A tied tiny model, its own tokenizer's decomposition and its logits on a sentence."""
    base = tiny_llama(tie=True)
    logits = jax.jit(lambda params, ids: Llama(base.config).apply({"params": params}, ids).logits)
    ids = jnp.asarray([base.tokenizer.encode(GERMAN[0])])
    return base, decompose(base.tokenizer, base.tokenizer.hf), logits, ids, logits(base.params, ids)


@pytest.mark.parametrize("method", ["fvt", "focus", "omp"])
def test_own_tokenizer_reproduces_the_logits(own, method):
    base, own_dec, logits, ids, expected = own
    aux = {"focus": random_aux, "omp": donor_aux, "fvt": lambda d: {}}[method](own_dec)
    out = transfer(base, base.tokenizer.hf, method, aux=aux, decomposition=own_dec)
    assert out.config == base.config
    chex.assert_trees_all_close(logits(out.params, ids), expected, rtol=0, atol=0)


def test_new_matrices_are_sharded_over_vocab_on_a_mesh(base, dec):
    from jaxtok.sharding import make_mesh

    with jax.set_mesh(make_mesh("tensor=4", jax.devices()[:4])):
        out = run(base, "fvt", dec)
    spec = out.params["embedding"].sharding.spec
    assert spec[0] == "tensor", spec  # 360 rows split 4 ways over the `vocab` -> tensor rule
    np.testing.assert_array_equal(np.asarray(out.params["embedding"]),
                                  np.asarray(run(base, "fvt", dec).params["embedding"]))


# ---------------------------------------------------------------------------------------------
# sparsemax


def sparsemax_twin(z: np.ndarray) -> np.ndarray:
    """Martins & Astudillo's algorithm 1, written out for one vector."""
    zs = sorted(z, reverse=True)
    k_max, total = 0, 0.0
    for k, value in enumerate(zs, start=1):
        total += value
        if 1 + k * value > total:
            k_max, support_sum = k, total
    tau = (support_sum - 1) / k_max
    return np.maximum(z - tau, 0)


class SparsemaxTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_values(self):
        f = self.variant(sparsemax)
        chex.assert_trees_all_close(f(jnp.array([3.0, 1.0, 0.0])), jnp.array([1.0, 0.0, 0.0]))
        chex.assert_trees_all_close(f(jnp.array([0.5, 0.5, -2.0])), jnp.array([0.5, 0.5, 0.0]))
        chex.assert_trees_all_close(f(jnp.array([0.2, 0.0])), jnp.array([0.6, 0.4]), atol=1e-6)


_sparsemax_jit = jax.jit(sparsemax)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=1, max_size=12))
def test_sparsemax_is_on_the_simplex_and_equals_its_twin(values):
    # padded to one length with -inf (excluded entries, as masked scores are): one compilation
    z = np.full(12, -np.inf, np.float32)
    z[:len(values)] = values
    p = np.asarray(_sparsemax_jit(jnp.asarray(z)))
    assert p.min() >= 0 and (p[len(values):] == 0).all()
    np.testing.assert_allclose(p.sum(), 1.0, atol=1e-5)
    np.testing.assert_allclose(p[:len(values)], sparsemax_twin(np.asarray(values, np.float64)), atol=1e-5)


def test_sparsemax_is_sparse_on_spread_scores():
    z = jnp.linspace(-1, 1, 50)[None]
    p = np.asarray(sparsemax(z))[0]
    assert (p == 0).sum() >= 40 and abs(p.sum() - 1) < 1e-6


# ---------------------------------------------------------------------------------------------
# OMP


def omp_twin(target: np.ndarray, atoms: np.ndarray, k: int):
    """Plain OMP: pick the atom most correlated (cosine) with the residual, refit by lstsq."""
    chosen, residual = [], target.copy()
    unit = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)
    for _ in range(k):
        corr = np.abs(unit @ residual)
        corr[chosen] = -np.inf
        chosen.append(int(np.argmax(corr)))
        coef, *_ = np.linalg.lstsq(atoms[chosen].T, target, rcond=None)
        residual = target - atoms[chosen].T @ coef
    return chosen, coef


def test_omp_equals_its_twin():
    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(40, 16)).astype(np.float64)
    targets = rng.normal(size=(5, 16))
    idx, coef = omp(jnp.asarray(targets, jnp.float32), jnp.asarray(atoms, jnp.float32), 4)
    for b in range(5):
        chosen, expected = omp_twin(targets[b], atoms, 4)
        assert list(np.asarray(idx[b])) == chosen
        np.testing.assert_allclose(np.asarray(coef[b]), expected, rtol=1e-3, atol=1e-4)


def test_omp_reconstructs_a_shared_token_with_one_atom():
    rng = np.random.default_rng(1)
    atoms = rng.normal(size=(30, 12)) * rng.uniform(0.2, 3, size=(30, 1))  # unequal norms
    # the two shortest atoms: a raw inner product would pick a longer neighbour instead
    shortest = [int(i) for i in np.argsort(np.linalg.norm(atoms, axis=1))[:2]]
    idx, coef = omp(jnp.asarray(atoms[shortest], jnp.float32), jnp.asarray(atoms, jnp.float32), 1)
    np.testing.assert_array_equal(np.asarray(idx)[:, 0], shortest)
    np.testing.assert_allclose(np.asarray(coef)[:, 0], [1.0, 1.0], rtol=1e-5)


def test_omp_transfers_donor_coefficients(base, dec):
    aux = donor_aux(dec)
    out = np.asarray(run(base, "omp", dec, aux=aux, options=["k=3"]).params["embedding"])
    donor, table = aux["donor"]["input"], np.asarray(base.params["embedding"])
    shared = np.flatnonzero(dec.overlap >= 0)
    row = int(np.flatnonzero(dec.copied < 0)[0])
    chosen, coef = omp_twin(donor[row].astype(np.float64), donor[shared].astype(np.float64), 3)
    np.testing.assert_allclose(out[row], coef @ table[dec.overlap[shared[chosen]]], rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# TokenAdapt and FOCUS against plain twins


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_tokenadapt_equals_its_formula(base, dec):
    aux = tokenadapt_aux(dec)
    out = np.asarray(run(base, "tokenadapt", dec, aux=aux).params["embedding"])
    table = np.asarray(base.params["embedding"])
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    new_vec, base_vec = unit(aux["new_vectors"]), unit(aux["base_vectors"])
    length = lambda s: len(s.lstrip(b" ").decode("utf-8", errors="replace"))
    for row in np.flatnonzero((dec.copied < 0) & dec.mask.any(1))[:12]:
        pieces = [int(p) for p, m in zip(dec.pieces[row], dec.mask[row]) if m]
        a = softmax(base_vec[pieces] @ new_vec[row])
        ratio = np.array([length(dec.base.surfaces[p]) / max(1, length(dec.new.surfaces[row])) for p in pieces])
        local = softmax((a + ratio) / 2 / 0.3) @ table[pieces]
        sims = base_vec @ new_vec[row]
        sims[dec.base.special] = -np.inf
        top = np.argsort(-sims)[:3]
        glob = softmax(sims[top] / 0.3) @ table[top]
        np.testing.assert_allclose(out[row], 0.7 * local + 0.3 * glob, rtol=1e-4, atol=1e-5)


def test_focus_combines_overlap_by_sparsemax(base, dec):
    aux = random_aux(dec)
    out = np.asarray(run(base, "focus", dec, aux=aux).params["embedding"])
    table = np.asarray(base.params["embedding"])
    vec = aux["vectors"] / np.linalg.norm(aux["vectors"], axis=1, keepdims=True)
    anchors = np.flatnonzero((dec.overlap >= 0) & aux["has_vector"])
    targets = np.flatnonzero((dec.copied < 0) & aux["has_vector"])
    for row in targets[:5]:
        w = sparsemax_twin((vec[anchors] @ vec[row]).astype(np.float64))
        np.testing.assert_allclose(out[row], w @ table[dec.overlap[anchors]], rtol=1e-4, atol=1e-5)
    # tokens without a vector: draws around the base mean, not copies of one row
    missing = np.flatnonzero((dec.copied < 0) & ~aux["has_vector"])
    assert missing.size >= 2 and not np.allclose(out[missing[0]], out[missing[1]])


@pytest.mark.reference
def test_focus_matches_deepfocus(base, dec):
    """deepfocus's own combination step (``focus_additional_token_initialization``) fed the
    same auxiliary vectors and overlap gives the same new embeddings."""
    torch = pytest.importorskip("torch")
    focus = pytest.importorskip("deepfocus.focus")
    from deepfocus.vocab_helper import NewToken, OverlappingToken, TokenClass

    aux = random_aux(dec)
    table = np.asarray(base.params["embedding"])
    ours = np.asarray(run(base, "focus", dec, aux=aux).params["embedding"])

    def token(i):
        return TokenClass(native_form=str(i), id=int(i), canonical_form=str(i), fuzzy_form=str(i),
                          uncased_form=str(i), no_whitespace_form=str(i), is_beginning_of_word=False)

    overlapping = {}
    for i in np.flatnonzero((dec.overlap >= 0) & aux["has_vector"]):
        t = OverlappingToken(target=token(i), source=[token(dec.overlap[i])])
        t.source_embedding = torch.from_numpy(np.array(table[dec.overlap[i]]))
        t.auxiliary_embedding = aux["vectors"][i]
        overlapping[str(i)] = t
    new = {}
    for i in np.flatnonzero((dec.copied < 0) & aux["has_vector"]):
        t = NewToken(target=token(i))
        t.auxiliary_embedding = aux["vectors"][i]
        new[str(i)] = t
    theirs = focus.focus_additional_token_initialization(
        overlapping, new, torch.zeros((dec.num_new, table.shape[1]))).numpy()
    rows = np.array([int(k) for k in new])
    np.testing.assert_allclose(ours[rows], theirs[rows], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_unknown_method_and_options_are_named(base, dec):
    with pytest.raises(TransferError, match="unknown transfer method 'magic'"):
        transfer(base, german_tokenizer(), "magic")
    with pytest.raises(TransferError, match="unknown option 'kk' for method 'omp'.*valid options: chunk, k"):
        parse_options("omp", ["kk=3"])
    with pytest.raises(TransferError, match="option k: expected int"):
        parse_options("omp", ["k=three"])
    with pytest.raises(TransferError, match="expected key=value"):
        parse_options("tokenadapt", ["w"])
    assert parse_options("tokenadapt", ["w=0.5", "k=5"]).w == 0.5


def test_focus_and_omp_need_their_inputs(base, dec):
    with pytest.raises(TransferError, match="focus needs target-domain text"):
        transfer(base, german_tokenizer(), "focus", decomposition=dec)
    with pytest.raises(TransferError, match="omp needs a donor"):
        transfer(base, german_tokenizer(), "omp", decomposition=dec)
    wrong_donor = tiny_llama()  # speaks the base tokenizer, not the new one
    with pytest.raises(TransferError, match="donor's tokenizer"):
        transfer(base, german_tokenizer(), "omp", donor=wrong_donor, decomposition=dec)


def test_focus_trains_fasttext_on_target_text(base, dec):
    out = transfer(base, german_tokenizer(), "focus", ["min_count=1", "epochs=1", "dim=16"], texts=GERMAN,
                   decomposition=dec)
    table = np.asarray(out.params["embedding"])
    assert np.isfinite(table).all() and out.record["options"]["dim"] == 16
