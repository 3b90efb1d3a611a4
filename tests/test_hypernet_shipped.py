"""The hypernetwork shipped for SmolLM2-135M: it loads from the package, and ``jaxtok transfer
--method hypernet`` (no path: the shipped weights) moves the real model to a new 1k-token
tokenizer (every row finite and at the base embeddings' scale, special tokens copied, tokens equal
to a base token near that token's embedding); transformers loads the folder with jaxtok's logits."""

import jax.numpy as jnp
import numpy as np
import pytest
from _transfer_models import ENGLISH, GERMAN

from jaxtok.cli import main
from jaxtok.models.llama import Llama
from jaxtok.models.registry import load_pretrained_lm
from jaxtok.transfer.hypernet import load_hypernet, shipped_hypernet
from jaxtok.transfer.train_tokenizer import train_tokenizer

BASE = "smollm2-135m"


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    work = tmp_path_factory.mktemp("shipped")
    base = load_pretrained_lm(BASE)
    new_tok = train_tokenizer(ENGLISH + GERMAN, "bpe", 1000, base=base.tokenizer.hf)
    new_tok.save(str(work / "new.json"))
    out = work / "smollm2-hypernet"
    assert main(["transfer", "--model", BASE, "--tokenizer", str(work / "new.json"), "--method", "hypernet",
                 "--out", str(out), "--no-chat-template"]) == 0
    return base, new_tok, load_pretrained_lm("transferred", out), out


def test_the_package_ships_trained_weights_for_smollm2():
    folder = shipped_hypernet(BASE)
    assert folder is not None, "jaxtok/hypernets/smollm2-135m is missing from the package"
    config, params, meta = load_hypernet(folder)
    assert meta["base_model"] == BASE and meta["steps"] >= 500  # trained, not an initialisation
    assert config.embed_dim == 576 and config.tied
    assert sum(folder.joinpath(name).stat().st_size for name in ("model.safetensors", "config.json")) < 25e6


def test_shipped_hypernet_transfers_smollm2_to_a_new_tokenizer(moved):
    base, new_tok, lm, _ = moved
    table = np.asarray(lm.params["embedding"], np.float32)
    old = np.asarray(base.params["embedding"], np.float32)
    assert table.shape == (new_tok.get_vocab_size(), 576) and np.isfinite(table).all()
    norms, base_norms = np.linalg.norm(table, axis=1), np.linalg.norm(old, axis=1)
    assert 0.5 < np.median(norms) / np.median(base_norms) < 2.0
    eot_new, eot_old = new_tok.token_to_id("<|endoftext|>"), base.tokenizer.hf.token_to_id("<|endoftext|>")
    np.testing.assert_array_equal(table[eot_new], old[eot_old])  # special tokens are copied
    # a token that is one base token keeps (nearly) that token's embedding: the auxiliary loss
    shared = [(i, base.tokenizer.hf.token_to_id(t)) for t, i in new_tok.get_vocab().items()
              if len(t) > 2 and base.tokenizer.hf.token_to_id(t) is not None][:200]
    new_ids, old_ids = map(list, zip(*shared))
    rel = np.linalg.norm(table[new_ids] - old[old_ids], axis=1) / np.linalg.norm(old[old_ids], axis=1)
    assert np.median(rel) < 0.5, np.median(rel)


@pytest.mark.reference
def test_transformers_loads_the_transferred_folder_with_jaxtoks_logits(moved):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, _, lm, out = moved
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = lm.tokenizer.encode(GERMAN[1])[:24]
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(Llama(lm.config).apply({"params": lm.params}, jnp.asarray([ids])).logits)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=2e-3 * np.abs(theirs).max())
