"""Decomposition of new tokens into base pieces: byte-level BPE, WordPiece, Metaspace, specials."""

import numpy as np
import pytest
from _transfer_models import CHAT, base_tokenizer, german_tokenizer, text_tokenizer, wordpiece_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from jaxtok.tokenization import TextTokenizer
from jaxtok.transfer.decompose import TransferError, byte_to_char, decompose, vocabulary


def byte_bpe(tokens: list[str], merges: list[tuple[str, str]], specials=("<|endoftext|>",)) -> Tokenizer:
    """A byte-level BPE over the whole byte alphabet plus ``tokens`` (ByteLevel characters)."""
    alphabet = [byte_to_char()[b] for b in range(256)]
    vocab = {t: i for i, t in enumerate([*specials, *alphabet, *tokens])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    return tok


def test_byte_level_surfaces_are_bytes_even_for_a_split_character():
    # "ü" is C3 BC in UTF-8: the ByteLevel characters "Ã" and "¼"
    new = byte_bpe(["Ã¼", "Ġg", "Ġgr", "ĠgrÃ"], [("Ã", "¼"), ("Ġ", "g"), ("Ġg", "r"), ("Ġgr", "Ã")])
    vocab = vocabulary(new)
    ids = {t: new.token_to_id(t) for t in ("Ã¼", "ĠgrÃ", "Ã")}
    assert vocab.kind == "byte_level"
    assert vocab.surfaces[ids["Ã¼"]] == "ü".encode()
    assert vocab.surfaces[ids["Ã"]] == b"\xc3"  # not valid UTF-8 on its own
    assert vocab.surfaces[ids["ĠgrÃ"]] == b" gr\xc3"


def test_fragment_of_a_multibyte_character_decomposes_into_base_bytes():
    base = byte_bpe(["Ġg", "Ġgr", "Ã¼"], [("Ġ", "g"), ("Ġg", "r"), ("Ã", "¼")])
    new = byte_bpe(["Ġg", "Ġgr", "ĠgrÃ"], [("Ġ", "g"), ("Ġg", "r"), ("Ġgr", "Ã")])
    dec = decompose(text_tokenizer(base), new)
    row = new.token_to_id("ĠgrÃ")
    pieces = [base.id_to_token(int(i)) for i, m in zip(dec.pieces[row], dec.mask[row]) if m]
    assert pieces == ["Ġgr", "Ã"]  # the lone lead byte, not U+FFFD
    assert dec.overlap[row] == -1
    assert dec.overlap[new.token_to_id("Ġgr")] == base.token_to_id("Ġgr")
    assert dec.overlap[new.token_to_id("Ã")] == base.token_to_id("Ã")


def test_wordpiece_continuations_match_byte_level_tokens_by_surface():
    wp = wordpiece_tokenizer()
    vocab = vocabulary(wp)
    assert vocab.kind == "wordpiece"
    cont = next(t for t in wp.get_vocab() if t.startswith("##") and len(t) > 3)
    assert vocab.surfaces[wp.token_to_id(cont)] == cont[2:].encode()
    assert vocab.surfaces[wp.token_to_id("the")] == b" the"
    # a byte-level token " the" is the same token as WordPiece's word-initial "the"
    new = byte_bpe(["Ġt", "Ġth", "Ġthe"], [("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e")], specials=("[CLS]", "[SEP]"))
    base = TextTokenizer(hf=wp, bos_id=wp.token_to_id("[CLS]"), eos_id=wp.token_to_id("[SEP]"))
    dec = decompose(base, new)
    assert dec.overlap[new.token_to_id("Ġthe")] == wp.token_to_id("the")
    assert dec.special[new.token_to_id("[CLS]")] == wp.token_to_id("[CLS]")
    # a continuation decomposes into continuation pieces of the base
    row = new.token_to_id("e")
    assert wp.id_to_token(int(dec.pieces[row, 0])) == "##e"


def test_metaspace_and_byte_fallback_surfaces():
    vocab = {"<unk>": 0, "▁der": 1, "er": 2, "<0xC3>": 3, "▁": 4}
    tok = Tokenizer(models.Unigram([(t, -1.0) for t in vocab], unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    v = vocabulary(tok)
    assert v.kind == "metaspace"
    assert v.surfaces[1] == b" der" and v.surfaces[2] == b"er" and v.surfaces[3] == b"\xc3"


def test_specials_map_by_role_and_chat_tokens_are_required():
    base_hf = Tokenizer.from_str(base_tokenizer().to_str())
    base_hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    base = text_tokenizer(base_hf, chat_template=CHAT)
    # a new tokenizer whose end-of-text token has another name: mapped by role
    new = byte_bpe([], [], specials=("</s>",))
    with pytest.raises(TransferError, match=r"<\|im_start\|>.*chat template"):
        decompose(base, new)
    dec = decompose(base, new, require_chat_tokens=False)
    assert dec.special[new.token_to_id("</s>")] == base_hf.token_to_id("<|endoftext|>")
    # with the base's special tokens kept, they map by content
    kept = byte_bpe([], [], specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    dec = decompose(base, kept)
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert dec.special[kept.token_to_id(t)] == base_hf.token_to_id(t)


def test_trained_target_tokenizer_overlaps_and_decomposes():
    dec = decompose(text_tokenizer(base_tokenizer()), german_tokenizer())
    assert dec.pieces.shape == dec.mask.shape == (german_tokenizer().get_vocab_size(), dec.pieces.shape[1])
    # every non-special token has pieces, and they spell the token's surface exactly
    base_vocab = dec.base
    for row in range(dec.num_new):
        if dec.new.special[row]:
            continue
        spelled = b"".join(base_vocab.surfaces[int(i)] for i, m in zip(dec.pieces[row], dec.mask[row]) if m)
        assert spelled == dec.new.surfaces[row]
    assert (dec.overlap >= 0).sum() > 256  # the bytes at least


def test_no_overlap_is_an_error():
    base = text_tokenizer(base_tokenizer())
    alien = Tokenizer(models.WordLevel({"[UNK]": 0, "ω": 1, "ψ": 2}, unk_token="[UNK]"))
    alien.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(TransferError, match="shares no token"):
        decompose(base, alien)
    assert np.asarray(vocabulary(alien).special).sum() == 0
