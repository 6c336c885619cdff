"""CPT corpora: reading with bad rows, packing, split, caching, and the resumable batch order."""

import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llada_train.data.text import (
    MAX_LINE_CHARS,
    BatchIterator,
    build_corpus,
    load_documents,
    pack_documents,
    stdlib_files,
)
from llada_train.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


# ----------------------------------------------------------------------------- packing


def _naive_pack(docs, seq_len, eos):
    stream = [(t, d) for d, doc in enumerate(docs) for t in [*doc, eos]]
    ids, dids = [], []
    for start in range(0, len(stream), seq_len):
        chunk = stream[start:start + seq_len]
        renumber = {}
        row_ids = [t for t, _ in chunk] + [eos] * (seq_len - len(chunk))
        row_docs = [renumber.setdefault(d, len(renumber)) for _, d in chunk] + [-1] * (seq_len - len(chunk))
        ids.append(row_ids)
        dids.append(row_docs)
    return ids, dids


@pytest.mark.parametrize("trial", range(6))
def test_pack_matches_naive_reference(trial):
    rng = random.Random(trial)
    eos = rng.choice([0, 7])
    docs = [[rng.randint(1, 50) for _ in range(rng.choice([0, 1, rng.randint(2, 40)]))]
            for _ in range(rng.randint(1, 30))]
    seq_len = rng.choice([1, 3, 8, 17])
    ids, doc_ids = pack_documents(docs, seq_len, eos)
    ref_ids, ref_docs = _naive_pack(docs, seq_len, eos)
    assert ids.dtype == torch.int64 and doc_ids.dtype == torch.int32
    assert ids.tolist() == ref_ids
    assert doc_ids.tolist() == ref_docs
    n_tokens = sum(len(d) + 1 for d in docs)
    assert int((doc_ids >= 0).sum()) == n_tokens and ids.shape[0] == -(-n_tokens // seq_len)


def test_pack_empty():
    ids, docs = pack_documents([], 4, 0)
    assert ids.shape == docs.shape == (0, 4)


# ----------------------------------------------------------------------------- reading


def _bad_corpus(root):
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "a.txt").write_text("alpha text\n")
    (root / "b.md").write_text("# beta\n")
    (root / "sub" / "c.py").write_text("print('gamma')\n")
    (root / "empty.txt").write_text("")
    (root / "blank.md").write_text("  \n\t\n")
    (root / "binary.txt").write_bytes(b"abc\x00\x01\x02def")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / "huge.txt").write_text("ok\n" + "x" * (MAX_LINE_CHARS + 1) + "\n")
    (root / "ignored.bin").write_bytes(b"not a document")
    (root / ".git" / "hidden.txt").write_text("hidden")
    lines = [
        json.dumps({"text": "row one"}).encode(),
        b"{not json",
        json.dumps({"other": "no text field"}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": ""}).encode(),
        b"",
        json.dumps({"text": "nul\u0000inside"}).encode(),
        b'{"text": "bad \xff bytes"}',
        b'{"text": "lone \\ud800 surrogate"}',
        json.dumps(["a", "list"]).encode(),
        json.dumps({"text": "y" * (MAX_LINE_CHARS + 5)}).encode(),
        json.dumps({"text": "row two"}).encode(),
    ]
    (root / "rows.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (root / "list.json").write_text(json.dumps([{"text": "json one"}, {"text": None}, {"text": "json two"}]))
    pq.write_table(pa.table({"text": ["pq one", None, " ", "pq two"]}), root / "t.parquet")
    expected_docs = ["alpha text\n", "# beta\n", "json one", "json two", "row one", "row two",
                     "print('gamma')\n", "pq one", "pq two"]  # sorted relative paths
    expected_stats = {
        "files": 11, "docs": 9,
        "skipped_empty": 5,       # empty.txt, blank.md, jsonl "" and blank line, parquet " "
        "skipped_binary": 2,      # binary.txt, jsonl NUL
        "skipped_undecodable": 3,  # latin1.txt, jsonl invalid bytes, jsonl lone surrogate
        "skipped_long_line": 2,   # huge.txt, jsonl huge row
        "skipped_bad_json": 1,
        "skipped_not_text": 5,    # missing field, int, list row, json null, parquet null
    }
    return expected_docs, expected_stats


def test_bad_rows_are_skipped_and_counted(tmp_path):
    expected_docs, expected_stats = _bad_corpus(tmp_path / "corpus")
    docs, stats = load_documents([str(tmp_path / "corpus")])
    assert list(docs) == expected_docs
    assert dict(stats) == expected_stats


def test_max_docs_and_stdlib_order():
    docs, stats = load_documents(["stdlib"], max_docs=5)
    docs = list(docs)
    files = stdlib_files()
    assert len(docs) == 5 and stats["docs"] == 5
    expected = [t for t in (p.read_text(encoding="utf-8") for p in files[:20]) if t.strip()][:5]
    assert docs == expected
    assert all("site-packages" not in str(p) and "/test/" not in str(p) for p in files)


def test_bad_paths_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"data path '.*missing\.txt' does not exist; expected .*\.jsonl"):
        load_documents([str(tmp_path / "missing.txt")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"x\.csv' has an unsupported suffix '\.csv'"):
        load_documents([str(tmp_path / "x.csv")])
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match=r"data directory '.*nothing' holds no"):
        load_documents([str(tmp_path / "nothing")])
    with pytest.raises(ValueError, match="missing dataset name"):
        load_documents(["hf:"])
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    docs, _ = load_documents([str(tmp_path / "t.parquet")])
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['body'\]\)"):
        list(docs)
    if os.geteuid() != 0:  # root reads everything
        (tmp_path / "locked.txt").write_text("x")
        os.chmod(tmp_path / "locked.txt", 0)
        with pytest.raises(ValueError, match="is not readable"):
            load_documents([str(tmp_path / "locked.txt")])


# ----------------------------------------------------------------------------- corpus


def _texts_of(ids, tok):
    """Documents back from packed rows: split the flat stream at EOS, drop the padding."""
    flat = ids.flatten().tolist()
    out, cur = [], []
    for t in flat:
        if t == tok.eos_token_id:
            out.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    return [t for t in out if t]  # trailing EOS padding decodes to empty documents


def _write_docs(root, texts):
    root.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(texts):
        (root / f"{i:03d}.txt").write_text(t)


def test_build_corpus_split_is_by_content_and_complete(tmp_path, tok):
    rng = random.Random(0)
    texts = [f"doc {i}: " + " ".join(str(rng.randint(0, 10**6)) for _ in range(rng.randint(1, 40)))
             for i in range(60)]
    texts[3] += " literal <|endoftext|> stays text"
    _write_docs(tmp_path / "a", texts)
    c = build_corpus([str(tmp_path / "a")], tok, seq_len=32, eval_fraction=0.2, seed=1)
    train, evals = _texts_of(c.train_ids, tok), _texts_of(c.eval_ids, tok)
    assert sorted(train + evals) == sorted(texts)
    assert 0 < len(evals) < len(texts) and c.stats["eval_docs"] == len(evals)
    assert c.train_docs.shape == c.train_ids.shape and c.train_ids.shape[1] == 32
    assert c.stats["train_tokens"] == int((c.train_docs >= 0).sum())

    # adding documents never moves an existing one across the split
    _write_docs(tmp_path / "b", [f"extra {i} " * 5 for i in range(40)])
    c2 = build_corpus([str(tmp_path / "b"), str(tmp_path / "a")], tok, seq_len=32, eval_fraction=0.2, seed=1)
    evals2 = set(_texts_of(c2.eval_ids, tok))
    assert set(evals) == evals2 & set(texts)
    # another seed gives another split
    c3 = build_corpus([str(tmp_path / "a")], tok, seq_len=32, eval_fraction=0.2, seed=2)
    assert set(_texts_of(c3.eval_ids, tok)) != set(evals)


def test_tiny_corpus_keeps_an_eval_doc(tmp_path, tok):
    _write_docs(tmp_path, ["one document", "another document"])
    c = build_corpus([str(tmp_path)], tok, seq_len=8, eval_fraction=0.01)
    assert c.stats["train_docs"] == 1 and c.stats["eval_docs"] == 1


def test_build_corpus_cache_and_num_proc(tmp_path, tok):
    kw = {"seq_len": 64, "eval_fraction": 0.1, "max_docs": 12}
    ref = build_corpus(["stdlib"], tok, **kw)
    cached = build_corpus(["stdlib"], tok, cache_dir=tmp_path / "cache", **kw)
    again = build_corpus(["stdlib"], tok, cache_dir=tmp_path / "cache", **kw)
    par = build_corpus(["stdlib"], tok, num_proc=2, **kw)
    assert "cache_hit" not in cached.stats and again.stats["cache_hit"] == 1
    for c in (cached, again, par):
        for name in ("train_ids", "train_docs", "eval_ids", "eval_docs"):
            assert torch.equal(getattr(c, name), getattr(ref, name)), name
    assert len(list((tmp_path / "cache").iterdir())) == 1
    # a changed file is a different corpus: a new cache entry, not a stale hit
    _write_docs(tmp_path / "d", ["first version of the text"] * 3)
    one = build_corpus([str(tmp_path / "d")], tok, seq_len=8, cache_dir=tmp_path / "cache")
    (tmp_path / "d" / "000.txt").write_text("second, longer version of the text")
    two = build_corpus([str(tmp_path / "d")], tok, seq_len=8, cache_dir=tmp_path / "cache")
    assert "cache_hit" not in two.stats and two.stats["train_tokens"] + two.stats["eval_tokens"] > (
        one.stats["train_tokens"] + one.stats["eval_tokens"])


def test_build_corpus_errors(tmp_path, tok):
    _write_docs(tmp_path, [""])
    with pytest.raises(ValueError, match="yielded no training documents"):
        build_corpus([str(tmp_path)], tok, seq_len=8)
    with pytest.raises(ValueError, match="eval_fraction"):
        build_corpus(["stdlib"], tok, seq_len=8, eval_fraction=1.0)


# ----------------------------------------------------------------------------- batch order


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_batch_iterator_epochs_are_permutations():
    it = BatchIterator(23, 5, seed=3, drop_last=False)
    assert len(it) == 5
    e0 = torch.cat(_take(it, 5))
    e1 = torch.cat(_take(it, 5))
    assert sorted(e0.tolist()) == list(range(23)) == sorted(e1.tolist())
    assert not torch.equal(e0, e1)
    it = BatchIterator(23, 5, seed=3)  # drop_last: 4 full batches of distinct rows
    e0 = torch.cat(_take(it, 4))
    assert len(set(e0.tolist())) == 20 and it.state_dict() == {"epoch": 1, "step_in_epoch": 0}


def test_batch_iterator_deterministic_and_seeded():
    a = _take(BatchIterator(100, 8, seed=5), 30)
    b = _take(BatchIterator(100, 8, seed=5), 30)
    c = _take(BatchIterator(100, 8, seed=6), 30)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shards_are_disjoint_and_cover_the_batch(world_size):
    full = BatchIterator(50, 8, seed=7)
    ranks = [BatchIterator(50, 8, seed=7, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(15):  # crosses two epoch boundaries
        batch = next(full)
        shards = [next(r) for r in ranks]
        assert all(len(s) == 8 // world_size for s in shards)
        assert torch.equal(torch.cat(shards), batch)
        assert len(set(torch.cat(shards).tolist())) == 8


@pytest.mark.parametrize("n_first", [1, 4, 6, 11])
def test_resume_continues_exactly(n_first):
    straight = _take(BatchIterator(30, 6, seed=11, rank=1, world_size=2), 20)
    first = BatchIterator(30, 6, seed=11, rank=1, world_size=2)
    _take(first, n_first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = BatchIterator(30, 6, seed=11, rank=1, world_size=2)
    resumed.load_state_dict(state)
    rest = _take(resumed, 20 - n_first)
    assert all(torch.equal(x, y) for x, y in zip(straight[n_first:], rest, strict=True))


def test_batch_iterator_errors():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchIterator(3, 4, seed=0)
    with pytest.raises(ValueError, match="multiple of the world size"):
        BatchIterator(30, 5, seed=0, world_size=2)
    it = BatchIterator(30, 5, seed=0)
    with pytest.raises(ValueError, match="does not fit this corpus"):
        it.load_state_dict({"epoch": 0, "step_in_epoch": 6})
    with pytest.raises(ValueError, match="expected integer 'epoch'"):
        it.load_state_dict({"step": 1})


def test_user_mistakes_are_user_errors(tmp_path):
    """Data paths, a corpus too small for the batch and data changed under a resume are the user's:
    UserError (one `error:` line from the CLI). A malformed data-order state from our own checkpoint
    and an impossible rank stay plain ValueErrors, bugs with their traceback."""
    from llada_train.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        load_documents([str(tmp_path / "missing.txt")])
    with pytest.raises(UserError, match="fewer than one global batch"):
        BatchIterator(3, 4, seed=0)
    with pytest.raises(UserError, match=r"train\.batch_size"):
        BatchIterator(30, 5, seed=0, world_size=2)
    with pytest.raises(UserError, match="does not fit this corpus"):
        BatchIterator(30, 5, seed=0).load_state_dict({"epoch": 0, "step_in_epoch": 6})
    for bad in (lambda: BatchIterator(30, 5, seed=0).load_state_dict({"step": 1}),
                lambda: BatchIterator(30, 6, seed=0, rank=2, world_size=2)):
        with pytest.raises(ValueError) as e:
            bad()
        assert not isinstance(e.value, UserError)
