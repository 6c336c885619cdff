"""The committed tokenizer (llada_train/data/tokenizer) and load_tokenizer's guarantees."""

import json
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llada_train.data.text import stdlib_files
from llada_train.data.tokenizer import DEFAULT_TOKENIZER, load_tokenizer, special_token_ids


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _roundtrip(tok, text: str) -> str:
    ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return tok.decode(ids)


def test_vocab_and_fixed_special_ids(tok):
    assert len(tok) == 4096
    assert tok.backend_tokenizer.get_vocab_size() == 4096
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", 0)
    assert tok.pad_token_id == 0
    assert (tok.mask_token, tok.mask_token_id) == ("<|mask|>", 1)
    assert tok.convert_tokens_to_ids(["<role>", "</role>", "<|role_end|>"]) == [2, 3, 4]
    assert special_token_ids(tok) == {0, 1, 2, 3, 4}
    assert load_tokenizer("default").get_vocab() == tok.get_vocab()
    size = sum(p.stat().st_size for p in DEFAULT_TOKENIZER.iterdir())
    assert size < 1_000_000, size


def test_digits_are_one_token_each(tok):
    rng = random.Random(0)
    for _ in range(50):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 30)))
        assert tok.tokenize(digits) == list(digits)
        text = f"x{rng.choice(['=', ' + ', '_', '.', ' '])}{digits}abc {digits[::-1]}."
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        covered = "".join(text[a:b] for a, b in enc["offset_mapping"])
        assert covered == text
        for a, b in enc["offset_mapping"]:
            if any(c.isdigit() for c in text[a:b]):
                assert b - a == 1, (text, text[a:b])


def test_roundtrip_stdlib_snippets(tok):
    rng = random.Random(1)
    files = stdlib_files()
    for path in rng.sample(files, 20):
        text = path.read_text(encoding="utf-8")
        a = rng.randrange(len(text) + 1)
        snippet = text[a:a + rng.randint(0, 3000)]
        assert _roundtrip(tok, snippet) == snippet


def test_roundtrip_random_unicode(tok):
    rng = random.Random(2)
    pools = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    for _ in range(60):
        chars = []
        for _ in range(rng.randint(0, 80)):
            lo, hi = rng.choice(pools)
            chars.append(chr(rng.randint(lo, hi)))
        if rng.random() < 0.3:  # literal special-token text stays text
            chars.insert(rng.randint(0, len(chars)), rng.choice(["<|mask|>", "<|endoftext|>", "<role>"]))
        text = "".join(chars)
        assert _roundtrip(tok, text) == text
        ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert not set(ids) & special_token_ids(tok)


def _reference_chat(messages, add_generation_prompt):
    names = {"system": "SYSTEM", "user": "HUMAN", "assistant": "ASSISTANT"}
    out = "".join(f"<role>{names[m['role']]}</role>{m['content']}<|role_end|>" for m in messages)
    return out + ("<role>ASSISTANT</role>" if add_generation_prompt else "")


def test_chat_template_renders_llada2_markup(tok):
    rng = random.Random(3)
    for _ in range(10):
        messages = [{"role": "system", "content": f"sys {rng.randint(0, 99)}"}] if rng.random() < 0.5 else []
        for _turn in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": f"{rng.randint(0, 999)}+{rng.randint(0, 999)}=?"})
            messages.append({"role": "assistant", "content": str(rng.randint(0, 2000))})
        gen = rng.random() < 0.5
        if gen:
            messages = messages[:-1]
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert rendered == _reference_chat(messages, gen)
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        assert ids[0] == 2 and ids.count(4) == len(messages)  # markers are single special tokens
        assert tok.decode(ids) == rendered


def _save_tiny(tmp_path, vocab, **specials):
    wl = Tokenizer(models.WordLevel(vocab=vocab, unk_token="a"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=wl, **specials).save_pretrained(tmp_path)
    return str(tmp_path)


def test_load_tokenizer_sets_mask_and_pad_when_present(tmp_path):
    path = _save_tiny(tmp_path, {"a": 0, "<eos>": 1, "<|mask|>": 2}, eos_token="<eos>")
    tok = load_tokenizer(path)
    assert tok.mask_token_id == 2 and tok.pad_token_id == 1 and tok.eos_token_id == 1


def test_load_tokenizer_errors(tmp_path):
    no_mask = _save_tiny(tmp_path / "nomask", {"a": 0, "<eos>": 1}, eos_token="<eos>")
    with pytest.raises(ValueError, match=r"no mask token and no '<\|mask\|>'"):
        load_tokenizer(no_mask)
    no_eos = _save_tiny(tmp_path / "noeos", {"a": 0, "<m>": 1}, mask_token="<m>")
    cfg = tmp_path / "noeos" / "tokenizer_config.json"
    assert "eos_token" not in json.loads(cfg.read_text())
    with pytest.raises(ValueError, match="has no eos token"):
        load_tokenizer(no_eos)
    with pytest.raises(ValueError, match=r"could not load tokenizer .*nowhere"):
        load_tokenizer(str(tmp_path / "nowhere"))
