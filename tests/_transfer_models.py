"""Tiny models and tokenizers for the tokenizer-transfer tests (made here, in seconds)."""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from jaxtok.io.gguf_io import LoadedLM
from jaxtok.models import bert, llama
from jaxtok.tokenization import TextTokenizer
from jaxtok.transfer.train_tokenizer import train_tokenizer

ENGLISH = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Language models read text as tokens, and the tokenizer decides where tokens end.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "A small model trained on a little text still learns which letters follow which.",
] * 8
GERMAN = [
    "Der schnelle braune Fuchs springt über den faulen Hund, während die Katze schläft.",
    "Grüße aus München: die Straßenbahn fährt täglich über die Brücke am Fluss.",
    "Sprachmodelle lesen Text als Tokens, und der Tokenizer entscheidet über die Grenzen.",
    "Schöne Äpfel, süße Birnen und größere Kürbisse liegen auf dem Markt in Köln.",
] * 8
EOT = "<|endoftext|>"
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def text_tokenizer(hf: Tokenizer, chat_template: str | None = None) -> TextTokenizer:
    eot = hf.token_to_id(EOT)
    return TextTokenizer(hf=hf, bos_id=eot, eos_id=eot, pad_id=eot, doc_start_id=eot,
                         chat_template=chat_template)


@functools.cache
def base_tokenizer() -> Tokenizer:
    return train_tokenizer(ENGLISH + GERMAN[:4], "bpe", 400)


@functools.cache
def german_tokenizer() -> Tokenizer:
    """A new byte-level BPE with the base's special tokens (``--base``)."""
    return train_tokenizer(GERMAN, "bpe", 360, base=base_tokenizer())


def random_params(module, seed: int, *inputs) -> dict:
    """N(0, 0.02) weights, norms at 1, in the module's tree: shapes from ``eval_shape`` (compiling
    ``init`` costs seconds even for a tiny model)."""
    shapes = flax.linen.unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.ones(leaf.shape, leaf.dtype) if "scale" in name else jnp.zeros(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0, 0.02, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def tiny_llama(tie: bool = False, seed: int = 0) -> LoadedLM:
    hf = base_tokenizer()
    config = dataclasses.replace(llama.PRESETS["llama-tiny"], vocab_size=hf.get_vocab_size(),
                                 d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                                 tie_embeddings=tie)
    params = random_params(llama.Llama(config), seed, jnp.zeros((1, 4), jnp.int32))
    return LoadedLM(config=config, params=params, tokenizer=text_tokenizer(hf), path=None)


def wordpiece_tokenizer() -> Tokenizer:
    from tokenizers import normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import WordPiece

    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(ENGLISH, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials,
                                                               show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")),
                                                 ("[SEP]", tok.token_to_id("[SEP]"))])
    return tok


def tiny_bert() -> LoadedLM:
    hf = wordpiece_tokenizer()
    config = bert.BertConfig(vocab_size=hf.get_vocab_size(), d_model=32, n_layers=2, n_heads=4, d_ff=64,
                             max_positions=64)
    params = random_params(bert.Bert(config), 1, jnp.zeros((1, 4), jnp.int32))
    ids = {t: hf.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
    tok = TextTokenizer(hf=hf, bos_id=ids["[CLS]"], eos_id=ids["[SEP]"], pad_id=ids["[PAD]"])
    return LoadedLM(config=config, params=params, tokenizer=tok, path=None)
