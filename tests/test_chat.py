"""SFT chat data: rendering, assistant-only supervision, EOS padding, truncation, malformed rows,
packing. Spans are checked against an independent string search in the rendered text."""

import json
import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llada_train.data.chat import load_chat_rows, render_prompt, tokenize_chat
from llada_train.data.tasks import make_rows
from llada_train.data.tokenizer import load_tokenizer

SPECIALS = ["<|endoftext|>", "<|mask|>", "<role>", "</role>", "<|role_end|>", "<|im_start|>", "<|im_end|>"]
LLADA_TEMPLATE = (
    "{%- set names = {'system': 'SYSTEM', 'user': 'HUMAN', 'assistant': 'ASSISTANT'} -%}"
    "{%- for m in messages -%}"
    "{{- '<role>' + names[m['role']] + '</role>' + m['content'] + '<|role_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<role>ASSISTANT</role>' -}}{%- endif -%}"
)
# ChatML with a default system prompt and a newline after each end marker
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}{{- '<|im_start|>system\nBe brief.<|im_end|>\n' -}}{%- endif -%}"
    "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
# drops earlier assistant turns' content (like templates that strip reasoning): not prefix-stable
UNSTABLE_TEMPLATE = (
    "{%- for m in messages -%}{%- if m['role'] == 'assistant' and not loop.last -%}"
    "{{- '<role>assistant</role><|role_end|>' -}}"
    "{%- else -%}{{- '<role>' + m['role'] + '</role>' + m['content'] + '<|role_end|>' -}}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<role>assistant</role>' -}}{%- endif -%}"
)
# (assistant header, end marker) per template, for the independent span search
MARKERS = {"llada": ("<role>ASSISTANT</role>", "<|role_end|>"), "project": ("<role>ASSISTANT</role>", "<|role_end|>"),
           "chatml": ("<|im_start|>assistant\n", "<|im_end|>\n")}
ALPHABET = "abcdefghij klmnop 0123456789+=,.?!é中"


def _make_tokenizer(template: str) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    corpus = [" ".join(r["messages"][0]["content"] for r in make_rows(["reversal", "copy"], 200, split="train",
                                                                       seed=0, kind="sft"))] * 3
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  mask_token="<|mask|>", additional_special_tokens=SPECIALS[2:],
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def toks():
    return {"llada": _make_tokenizer(LLADA_TEMPLATE), "chatml": _make_tokenizer(CHATML_TEMPLATE),
            "unstable": _make_tokenizer(UNSTABLE_TEMPLATE), "project": load_tokenizer(None)}


def _text(rng, lo=1, hi=12):
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(lo, hi))).strip() or "x"


def _conversation(rng, turns):
    msgs = [{"role": "system", "content": _text(rng)}] if rng.random() < 0.5 else []
    for _ in range(turns):
        msgs += [{"role": "user", "content": _text(rng)}, {"role": "assistant", "content": _text(rng)}]
    return {"messages": msgs}


def _reference_byte_mask(rendered: str, header: str, end: str) -> list[bool]:
    """Response bytes by string search: from after each assistant header to the end of the next
    end marker."""
    rendered, header, end = rendered.encode(), header.encode(), end.encode()
    mask, start = [False] * len(rendered), 0
    while (h := rendered.find(header, start)) >= 0:
        a = h + len(header)
        b = rendered.index(end, a) + len(end)
        mask[a:b] = [True] * (b - a)
        start = b
    return mask


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-unicode table used by byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + i): b for i, b in enumerate(extra)}}


BYTE_DECODER = _byte_decoder()


def _token_bytes(tok, token_id: int) -> bytes:
    piece = tok.convert_ids_to_tokens(token_id)
    if piece in tok.all_special_tokens:
        return piece.encode()
    return bytes(BYTE_DECODER[c] for c in piece)


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("name", ["llada", "chatml", "project"])
def test_multi_turn_supervises_only_assistant_turns(toks, name):
    tok, rng, block = toks[name], random.Random(name), 8
    rows = [_conversation(rng, rng.randint(1, 3)) for _ in range(40)]
    ds = tokenize_chat(rows, tok, block_size=block, max_len=None)
    assert len(ds) == 40 and ds.stats.examples == 40
    eos = tok.eos_token_id
    for row, ex in zip(rows, ds, strict=True):
        ids, resp, doc = ex["input_ids"].tolist(), ex["response_mask"].tolist(), ex["doc_ids"]
        rendered = tok.apply_chat_template(row["messages"], tokenize=False)
        assert tok.decode(tok.encode(rendered, add_special_tokens=False), skip_special_tokens=False) == rendered
        # the rendered text, then EOS padding: at least one, up to a block multiple
        n_pad = len(ids) - next(i for i in range(len(ids), 0, -1) if ids[i - 1] != eos)
        assert _decode(tok, ids[: len(ids) - n_pad]) == rendered
        assert 1 <= n_pad <= block and len(ids) % block == 0 and all(resp[len(ids) - n_pad:])
        assert ex["input_ids"].dtype == torch.long and ex["response_mask"].dtype == torch.bool
        assert doc.dtype == torch.int32 and (doc == 0).all()
        # token-level mask == reference byte mask over each token's bytes
        ref, pos = _reference_byte_mask(rendered, *MARKERS[name]), 0
        for i in range(len(ids) - n_pad):
            piece = _token_bytes(tok, ids[i])
            assert set(ref[pos: pos + len(piece)]) == {resp[i]}, (rendered, i, piece)
            pos += len(piece)
        assert pos == len(rendered.encode())
        # each response span is tokenized on its own: content + end marker
        assert sum(resp) - n_pad == sum(len(tok.encode(m["content"] + MARKERS[name][1], add_special_tokens=False))
                                        for m in row["messages"] if m["role"] == "assistant")


def test_render_prompt(toks):
    tok = toks["llada"]
    for name in ("llada", "project"):
        assert render_prompt("12+3=", toks[name]) == "<role>HUMAN</role>12+3=<|role_end|><role>ASSISTANT</role>"
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert render_prompt(msgs, toks["chatml"]) == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nq<|im_end|>\n" \
                                                  "<|im_start|>assistant\n"
    # the training prompt segment of a row is exactly the rendered inference prompt
    row = make_rows(["addition"], 1, split="train", seed=0, kind="sft")[0]
    ex = tokenize_chat([row], tok, block_size=4, max_len=None)[0]
    prompt_ids = ex["input_ids"][~ex["response_mask"]].tolist()
    assert prompt_ids == tok.encode(render_prompt(row["messages"][:1], tok), add_special_tokens=False)
    assert _decode(tok, ex["input_ids"][ex["response_mask"]].tolist()).startswith(row["answer"] + "<|role_end|>")
    with pytest.raises(ValueError, match="chat_template"):
        render_prompt("q", _make_tokenizer(None))


def test_alpaca_rows(toks):
    tok = toks["llada"]
    rows, stats = load_chat_rows([
        {"instruction": "add", "input": "2+2", "output": "4"},
        {"instruction": "say hi", "input": "", "output": "hi"},
        {"instruction": "name", "output": "bob", "system": "be nice", "id": 7},
    ])
    assert stats.rows_ok == 3 and stats.skipped == 0
    assert rows[0]["messages"] == [{"role": "user", "content": "add\n\n2+2"}, {"role": "assistant", "content": "4"}]
    assert rows[1]["messages"][0]["content"] == "say hi"
    assert rows[2]["messages"][0] == {"role": "system", "content": "be nice"} and rows[2]["id"] == 7
    ds = tokenize_chat(rows, tok, block_size=4, max_len=64)
    for row, ex in zip(rows, ds, strict=True):
        response = ex["input_ids"][ex["response_mask"]].tolist()
        eos_free = [i for i in response if i != tok.eos_token_id]
        assert _decode(tok, eos_free) == row["messages"][-1]["content"] + "<|role_end|>"


def test_truncation_policies_are_counted(toks):
    tok, rng, block, max_len = toks["llada"], random.Random(1), 8, 32
    rows = [{"messages": [{"role": "user", "content": _text(rng, 1, 40)},
                          {"role": "assistant", "content": _text(rng, 1, 30)}]} for _ in range(60)]
    full = tokenize_chat(rows, tok, block_size=block, max_len=None)
    lengths = [len(tok.encode(tok.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False))
               for r in rows]
    padded = [n + (-(n + 1) % block) + 1 for n in lengths]  # at least one EOS, block multiple
    assert [ex["input_ids"].numel() for ex in full] == padded
    too_long = [p > max_len for p in padded]
    assert 0 < sum(too_long) < len(rows)

    dropped = tokenize_chat(rows, tok, block_size=block, max_len=max_len, truncate="drop")
    assert dropped.stats.dropped_too_long == sum(too_long) and dropped.stats.truncated == 0
    assert len(dropped) == len(rows) - sum(too_long)
    kept = [ex for ex, long in zip(full, too_long, strict=True) if not long]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(dropped, kept, strict=True))

    cut = tokenize_chat(rows, tok, block_size=block, max_len=max_len, truncate="truncate")
    prompt_lens = [int((~ex["response_mask"]).sum()) for ex in full]
    no_response_left = [long and p >= max_len for long, p in zip(too_long, prompt_lens, strict=True)]
    assert cut.stats.dropped_too_long == sum(no_response_left)
    assert cut.stats.truncated == sum(too_long) - sum(no_response_left)
    survivors = [ex for ex, gone in zip(full, no_response_left, strict=True) if not gone]
    for a, b in zip(cut, survivors, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"][:max_len]) and a["response_mask"].any()
    with pytest.raises(ValueError, match="multiple of block_size"):
        tokenize_chat(rows, tok, block_size=block, max_len=30)
    with pytest.raises(ValueError, match="truncate"):
        tokenize_chat(rows, tok, block_size=block, max_len=32, truncate="cut")


def _bad_file_lines():
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    lines = [
        json.dumps(good),                                                              # 1 ok
        "{not json",                                                                   # 2 invalid JSON
        json.dumps({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}),  # 3 no role
        "",                                                                            # 4 blank: ignored
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}),  # 5
        json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}),  # 6
        json.dumps([1, 2]),                                                            # 7 not an object
        json.dumps({"instruction": "do", "input": "x", "output": "done"}),             # 8 ok (alpaca)
        json.dumps({"messages": [{"role": "user", "content": "q"}]}),                  # 9 no assistant
        json.dumps({"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}),  # 10
        json.dumps({"instruction": "do", "output": ""}),                               # 11 empty output
        json.dumps({"text": "plain"}),                                                 # 12 unknown format
        json.dumps({"messages": "hello"}),                                             # 13 wrong type
        json.dumps(good),                                                              # 14 ok
        "]",                                                                           # 15 beyond the report cap
    ]
    return lines, [2, 3, 5, 6, 7, 9, 10, 11, 12, 13]  # the first MAX_REPORTED = 10


def test_malformed_rows_are_counted_with_line_numbers(tmp_path, toks):
    lines, bad = _bad_file_lines()
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows, stats = load_chat_rows(str(path))
    assert stats.rows_read == 14 and stats.rows_ok == 3 == len(rows) and stats.skipped == 11
    assert stats.bad_lines == bad
    assert stats.bad_examples[0].startswith(f"{path}:2: invalid JSON")
    assert stats.skip_reasons["invalid JSON"] == 2 and stats.skip_reasons["missing role"] == 3
    assert "first bad rows" in stats.summary()
    ds = tokenize_chat(rows, toks["llada"], block_size=4, max_len=32, stats=stats)
    assert len(ds) == 3 and ds.stats is stats and stats.examples == 3

    with pytest.raises(ValueError, match=r"nope.jsonl"):
        load_chat_rows(str(tmp_path / "nope.jsonl"))


def test_json_and_parquet_sources_match_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = make_rows(["addition", "reversal"], 20, split="train", seed=2, kind="sft")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    loaded = [load_chat_rows(tmp_path / f"a.{ext}")[0] for ext in ("jsonl", "json", "parquet")]
    loaded.append(load_chat_rows(iter(rows))[0])
    assert all(x == rows for x in loaded)
    with pytest.raises(ValueError, match="unsupported"):
        (tmp_path / "a.txt").write_text("x")
        load_chat_rows(tmp_path / "a.txt")


def test_template_that_is_not_prefix_stable_skips_multi_turn_rows(toks):
    rng = random.Random(3)
    rows = [_conversation(rng, 1 + i % 2) for i in range(10)]
    ds = tokenize_chat(rows, toks["unstable"], block_size=4, max_len=None)
    assert len(ds) == 5 and ds.stats.skipped == 5 and ds.stats.bad_lines == [2, 4, 6, 8, 10]
    assert ds.stats.skip_reasons["template"] == 5


def test_packing_doc_ids(toks):
    tok, rng, block, max_len = toks["llada"], random.Random(5), 8, 64
    rows = [_conversation(rng, rng.randint(1, 2)) for _ in range(30)]
    plain = tokenize_chat(rows, tok, block_size=block, max_len=max_len)
    packed = tokenize_chat(rows, tok, block_size=block, max_len=max_len, pack=True)
    docs = [ex for ex in plain]
    # reference greedy packing of the (block-aligned) document lengths
    n_seq, used = 0, max_len
    for d in docs:
        if used + d["input_ids"].numel() > max_len:
            n_seq, used = n_seq + 1, 0
        used += d["input_ids"].numel()
    assert len(packed) == n_seq == packed.stats.sequences and packed.stats.examples == len(docs)
    it = iter(docs)
    for seq in packed:
        ids, resp, doc = seq["input_ids"], seq["response_mask"], seq["doc_ids"]
        assert ids.numel() == max_len
        n_docs = int(doc.max()) + 1
        tail = doc == -1
        assert tail.sum() == 0 or (tail.nonzero().min() == (~tail).sum())  # padding only at the end
        assert (ids[tail] == tok.eos_token_id).all() and not resp[tail].any()
        for k in range(n_docs):
            ref = next(it)
            sel = doc == k
            assert torch.equal(ids[sel], ref["input_ids"]) and torch.equal(resp[sel], ref["response_mask"])
            start = int(sel.nonzero().min())
            assert start % block == 0 and sel[start: start + int(sel.sum())].all()  # contiguous, block-aligned
    assert next(it, None) is None
    with pytest.raises(ValueError, match="pack"):
        tokenize_chat(rows, tok, block_size=block, max_len=None, pack=True)


def test_collate_pads_batch_to_block_multiple(toks):
    tok, block = toks["chatml"], 8
    rows = make_rows(["copy", "addition"], 6, split="train", seed=0, kind="sft")
    rows[0]["messages"][1]["content"] = "a much longer answer than the others, to force padding"
    ds = tokenize_chat(rows, tok, block_size=block, max_len=None)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    lengths = [ds[i]["input_ids"].numel() for i in range(len(ds))]
    L = max(lengths)
    assert batch["input_ids"].shape == batch["response_mask"].shape == batch["doc_ids"].shape == (6, L)
    assert L % block == 0 and len(set(lengths)) > 1
    for i, n in enumerate(lengths):
        assert torch.equal(batch["input_ids"][i, :n], ds[i]["input_ids"])
        assert (batch["input_ids"][i, n:] == tok.eos_token_id).all()
        assert not batch["response_mask"][i, n:].any() and (batch["doc_ids"][i, n:] == -1).all()
        assert (batch["doc_ids"][i, :n] == 0).all()
