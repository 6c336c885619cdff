"""Threshold decoder (docs/design.md §6) against oracle models with known answers and a naive per-row
reference decoder written here from the spec (batch 1, no padding, no cache, Python loops)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from llada_train.decoding import (
    DECODE_PRESETS,
    _pick,
    complete,
    generate,
    generation_config_dict,
    load_decode_defaults,
    mode_params,
)

from .conftest import tiny_config

EOS, MASK, V = 0, 1, 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls: OpenMP threads only add contention on a shared 2-core box.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Oracle(nn.Module):
    """Logits that depend only on the row position and on whether the input there is a mask:
    masked -> `draft[pos]` with probability `conf[pos]`; visible -> `visible[pos]` with probability
    `visible_conf` (`visible=None`: the input token itself; a function: `visible(input_ids)`).
    Records every forward's inputs."""

    def __init__(self, draft, conf, visible=None, visible_conf=0.9, vocab=V):
        super().__init__()
        self.vocab = vocab
        self.draft, self.conf, self.visible, self.visible_conf = draft, conf, visible, visible_conf
        self.config = SimpleNamespace(eos_token_id=EOS, mask_token_id=MASK)
        self.calls = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                commit_len=None, logits_to_keep=0):
        self.calls.append((position_ids.clone(), input_ids.clone()))
        input_ids, position_ids = input_ids[:, -logits_to_keep:], position_ids[:, -logits_to_keep:]
        masked = input_ids == MASK
        if self.visible is None:
            seen = input_ids
        else:
            seen = self.visible(input_ids) if callable(self.visible) else self.visible[position_ids]
        tok = torch.where(masked, self.draft[position_ids], seen)
        prob = torch.where(masked, self.conf[position_ids], torch.full_like(self.conf[position_ids], self.visible_conf))
        rest = ((1 - prob) / (self.vocab - 1)).clamp(min=1e-30).log()
        logits = rest[..., None].expand(*tok.shape, self.vocab).clone()  # (B, Q, V)
        logits.scatter_(-1, tok[..., None], prob.clamp(min=1e-30).log()[..., None])
        return SimpleNamespace(logits=logits)


def left_pad(prompts, pad=EOS):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.as_tensor(p)
    return ids, torch.tensor([len(p) for p in prompts])


def random_prompts(lengths, gen):
    return [torch.randint(2, V, (n,), generator=gen).tolist() for n in lengths]


def blocks_of(plen, gen_length, b):
    """Per response block of a row: how many response positions it holds (row-aligned blocks)."""
    counts = {}
    for pos in range(plen, plen + gen_length):
        counts[pos // b] = counts.get(pos // b, 0) + 1
    return [counts[k] for k in sorted(counts)]


def test_oracle_yields_target_and_threshold_parallelism():
    gen = torch.Generator().manual_seed(1)
    lengths, G, b = [5, 12, 9], 21, 8
    target = torch.randint(2, V, (64,), generator=gen)
    conf = 0.05 + 0.9 * torch.rand(64, generator=gen)
    ids, plen = left_pad(random_prompts(lengths, gen))
    for threshold in (0.5, 0.9):
        for use_cache in (True, False):
            out = generate(Oracle(target, conf), ids, gen_length=G, block_length=b, threshold=threshold,
                           eos_token_id=EOS, mask_token_id=MASK, prompt_lengths=plen, use_cache=use_cache)
            for r, p in enumerate(lengths):
                assert out.sequences[r, ids.shape[1]:].tolist() == target[p:p + G].tolist()
                # brute force: step 1 takes every mask above threshold (at least one), then one per step
                expect = 0
                for k in range(p // b, (p + G - 1) // b + 1):
                    pos = [i for i in range(max(p, k * b), min(p + G, (k + 1) * b))]
                    above = sum(conf[i] > threshold for i in pos)
                    expect += len(pos) - max(above, 1) + 1
                assert out.nfe[r] == expect
            assert torch.equal(out.sequences[:, :ids.shape[1]], ids)
            assert out.lengths.tolist() == [G] * 3 and out.edits.tolist() == [0] * 3
            assert torch.allclose(out.tokens_per_forward, out.lengths / out.nfe)


def test_threshold_one_is_one_token_per_forward():
    gen = torch.Generator().manual_seed(2)
    lengths, G, b = [3, 10, 7], 16, 4
    target, conf = torch.randint(2, V, (64,), generator=gen), 0.05 + 0.9 * torch.rand(64, generator=gen)
    ids, plen = left_pad(random_prompts(lengths, gen))
    for use_cache in (True, False):
        out = generate(Oracle(target, conf), ids, gen_length=G, block_length=b, threshold=1.0, eos_token_id=EOS,
                       mask_token_id=MASK, prompt_lengths=plen, use_cache=use_cache)
        assert out.nfe.tolist() == [G] * 3  # the cache commit rides on the next block's first forward
        # with editing on, each block needs one more forward to see that Δ is empty; draft-ahead makes
        # that forward also draft the next block's first token, so only the last block's check is extra
        for draft_ahead, expect in ((False, [G + len(blocks_of(p, G, b)) for p in lengths]), (True, [G + 1] * 3)):
            out = generate(Oracle(target, conf), ids, gen_length=G, block_length=b, threshold=1.0,
                           editing_threshold=0.5, eos_token_id=EOS, mask_token_id=MASK, prompt_lengths=plen,
                           use_cache=use_cache, draft_ahead=draft_ahead)
            assert out.nfe.tolist() == expect
            assert all(out.sequences[r, ids.shape[1]:].tolist() == target[p:p + G].tolist()
                       for r, p in enumerate(lengths))


def test_planted_errors_are_edited_and_prompt_never_is():
    gen = torch.Generator().manual_seed(3)
    lengths, G, b = [6, 11], 20, 8
    target = torch.randint(2, V, (64,), generator=gen)
    wrong = torch.rand(64, generator=gen) < 0.3
    draft = torch.where(wrong, (target + 1 - 2) % (V - 2) + 2, target)  # planted errors, never EOS/MASK
    conf = torch.full((64,), 0.95)
    prompts = random_prompts(lengths, gen)
    ids, plen = left_pad(prompts)
    # the oracle "sees" the target at visible positions with p = 0.8, prompt positions included
    cases = {0.5: (target, True), 0.9: (draft, False), None: (draft, False)}
    for editing_threshold, (expected, corrected) in cases.items():
        oracle = Oracle(draft, conf, visible=target, visible_conf=0.8)
        out = generate(oracle, ids, gen_length=G, block_length=b, threshold=0.7, editing_threshold=editing_threshold,
                       eos_token_id=EOS, mask_token_id=MASK, prompt_lengths=plen)
        for r, p in enumerate(lengths):
            assert out.sequences[r, ids.shape[1]:].tolist() == expected[p:p + G].tolist()
            n_wrong = int(wrong[p:p + G].sum())
            assert out.edits[r] == (n_wrong if corrected else 0)
            # per block: one forward fills it; with editing one more sees Δ (plus one per edit round),
            # and that last forward drafts the next block, whose filling forward is then saved
            per_block = []
            for k in range(p // b, (p + G - 1) // b + 1):
                has_wrong = bool(wrong[max(p, k * b):min(p + G, (k + 1) * b)].any())
                per_block.append(1 + (editing_threshold is not None) + (corrected and has_wrong))
            drafted = (len(per_block) - 1) if editing_threshold is not None else 0
            assert out.nfe[r] == sum(per_block) - drafted
        # Δ never touches the prompt: every forward saw the prompt tokens unchanged
        for pos, seen in oracle.calls:
            for r, prompt in enumerate(prompts):
                real = (pos[r] < len(prompt)) & (seen[r] != EOS)  # padding columns hold EOS
                assert seen[r][real].tolist() == [prompt[i] for i in pos[r][real].tolist()]


def test_edit_cycles_jump_to_the_state_max_post_steps_would_reach():
    """A model that flips every visible token (2t <-> 2t+1) cycles with period 2 in its post-steps:
    the decoder stops after two of them and lands where max_post_steps flips would have left it."""
    gen = torch.Generator().manual_seed(11)
    lengths, G, b = [5, 9], 16, 8
    target = torch.randint(2, V, (64,), generator=gen)
    ids, plen = left_pad(random_prompts(lengths, gen))
    flip = Oracle(target, torch.full((64,), 0.95), visible=lambda t: t ^ 1, visible_conf=0.9)
    for max_post_steps in (3, 4, 7):
        out = generate(flip, ids, gen_length=G, block_length=b, threshold=0.5, editing_threshold=0.5,
                       max_post_steps=max_post_steps, eos_token_id=EOS, mask_token_id=MASK, prompt_lengths=plen)
        for r, p in enumerate(lengths):
            expected = target[p:p + G] ^ (max_post_steps % 2)
            assert out.sequences[r, ids.shape[1]:].tolist() == expected.tolist()
            assert out.edits[r] == G * max_post_steps  # every skipped flip is counted
            assert out.nfe[r] == 3 * len(blocks_of(p, G, b))  # draft, flip, flip back: the cycle is seen
            response, nfe, edits = reference_decode(flip, ids[r, ids.shape[1] - p:].tolist(), G=G, b=b, threshold=0.5,
                                                    editing_threshold=0.5, max_post_steps=max_post_steps)
            assert (response, nfe, edits) == (expected.tolist(), out.nfe[r], out.edits[r])


def test_gamma_only_fills_masks():
    """Visible tokens are never rewritten without editing, even when the model is confident otherwise."""
    gen = torch.Generator().manual_seed(4)
    G, b = 24, 8
    draft, other = torch.randint(2, V, (64,), generator=gen), torch.randint(2, V, (64,), generator=gen)
    oracle = Oracle(draft, 0.1 + 0.8 * torch.rand(64, generator=gen), visible=other, visible_conf=0.99)
    ids, plen = left_pad(random_prompts([4, 9], gen))
    out = generate(oracle, ids, gen_length=G, block_length=b, threshold=0.5, eos_token_id=EOS, mask_token_id=MASK,
                   prompt_lengths=plen, use_cache=False)
    for r, p in enumerate(plen.tolist()):
        assert out.sequences[r, ids.shape[1]:].tolist() == draft[p:p + G].tolist()
    history = {}
    for pos, seen in oracle.calls:  # uncached: every forward sees the whole prefix
        for r in range(2):
            for i, t in zip(pos[r].tolist(), seen[r].tolist(), strict=True):
                if t != EOS:  # padding and the fixed tail of the last block
                    history.setdefault((r, i), []).append(t)
    for tokens in history.values():
        visible = [t for t in tokens if t != MASK]
        assert len(set(visible)) <= 1 and tokens == [MASK] * (len(tokens) - len(visible)) + visible


def test_eos_early_stop_per_row():
    gen = torch.Generator().manual_seed(5)
    G, b, e = 20, 4, 12  # EOS at row position 12
    target = torch.randint(2, V, (64,), generator=gen)
    target[e] = EOS
    lengths = [3, 9, 14]  # EOS at response offset 9, 3, and inside the prompt of the last row
    ids, plen = left_pad(random_prompts(lengths, gen))
    for early in (True, False):
        out = generate(Oracle(target, torch.full((64,), 0.3)), ids, gen_length=G, block_length=b, threshold=1.0,
                       eos_token_id=EOS, mask_token_id=MASK, prompt_lengths=plen, eos_early_stop=early)
        assert out.lengths.tolist() == [e - 3 + 1, e - 9 + 1, G]
        for r, p in enumerate(lengths):
            n = out.lengths[r]
            resp = out.sequences[r, ids.shape[1]:]
            assert resp[:n].tolist() == target[p:p + n].tolist() and (resp[n:] == EOS).all()
        stop = [(e // b + 1) * b - p for p in lengths[:2]] + [G]  # masks up to the block holding EOS
        assert out.nfe.tolist() == (stop if early else [G] * 3)


def test_steps_cap():
    gen = torch.Generator().manual_seed(6)
    G, b = 30, 8
    target = torch.randint(2, V, (64,), generator=gen)
    ids, plen = left_pad(random_prompts([5, 2], gen))
    for steps in (1, 3, 5):
        out = generate(Oracle(target, torch.full((64,), 0.2)), ids, gen_length=G, block_length=b, threshold=0.9,
                       steps=steps, eos_token_id=EOS, mask_token_id=MASK, prompt_lengths=plen)
        for r, p in enumerate(plen.tolist()):
            assert out.nfe[r] == sum(min(n, steps) for n in blocks_of(p, G, b))
            assert out.sequences[r, ids.shape[1]:].tolist() == target[p:p + G].tolist()


# ---- the real model: reference decoder, cache, MBE, sampling ---------------------------------------


def reference_decode(model, prompt, *, G, b, threshold, editing_threshold, max_post_steps=16, mbe_window=0, eos=EOS,
                     draft_ahead=True):
    """docs/design.md §6 for one unpadded row, written as plainly as possible: full forward every step.
    Draft-ahead: a block's first forward is free when the previous block ended on a forward that
    changed nothing (that forward already drafted this block). Edit cycles: every post-step still
    runs here, but once the window repeats an earlier post-step state, the forwards are free."""
    p = len(prompt)
    n_blocks = math.ceil((p + G) / b)
    x = list(prompt) + [MASK] * G + [eos] * (n_blocks * b - p - G)
    resp = range(p, p + G)
    nfe = edits = 0
    first = p // b
    drafted = False
    for k in range(first, n_blocks):
        lo, hi = max(k - mbe_window, first) * b, (k + 1) * b
        post, seen, cycling = 0, [], False
        while True:
            masked = [i for i in range(k * b, hi) if x[i] == MASK]
            if not masked and (editing_threshold is None or post == max_post_steps):
                break
            allowed = torch.tensor([[kk // b <= q // b for kk in range(hi)] for q in range(hi)])
            logits = model(torch.tensor([x[:hi]]), attention_mask=allowed[None, None],
                           position_ids=torch.arange(hi)[None]).logits[0].double()
            nfe += 0 if drafted or cycling else 1
            drafted = False
            logits[:, MASK] = -math.inf
            p_max, v = logits.softmax(-1).max(-1)
            changes = {}
            if masked:
                chosen = [i for i in masked if p_max[i] > threshold] or [max(masked, key=lambda i: p_max[i])]
                changes.update({i: int(v[i]) for i in chosen})
            if editing_threshold is not None:
                for i in range(lo, hi):
                    if i in resp and x[i] != MASK and int(v[i]) != x[i] and p_max[i] > editing_threshold:
                        changes[i] = int(v[i])
                        edits += 1
            if not masked:
                if len(changes) == 0:
                    drafted = draft_ahead
                    break
                post += 1
                seen.append(x[lo:hi])
            for i, t in changes.items():
                x[i] = t
            cycling = cycling or (not masked and x[lo:hi] in seen)
        if any(x[i] == eos for i in resp if i < hi) or k == n_blocks - 1:
            response = [t if t != MASK else eos for t in x[p:p + G]]
            if eos in response:
                cut = response.index(eos) + 1
                response = response[:cut] + [eos] * (G - cut)
            return response, nfe, edits


def make_peaky_model(shift_logits=False, seed=0):
    """Tiny model, random weights, sharpened output head so many tokens pass the thresholds."""
    from llada_train.model import LLaDA2MoeModelLM

    torch.manual_seed(seed)
    model = LLaDA2MoeModelLM(tiny_config(vocab_size=V, shift_logits=shift_logits)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model


@pytest.fixture(scope="module")
def peaky_model():
    return make_peaky_model()


@pytest.mark.parametrize("draft_ahead", [True, False])
@pytest.mark.parametrize("mbe_window", [0, 2])
@pytest.mark.parametrize("shift_logits", [False, True])
def test_batched_cached_matches_reference(peaky_model, mbe_window, draft_ahead, shift_logits):
    """With `shift_logits` a block's first position reads the hidden state of the token before the block:
    from the cache's last committed position when cached, from the full forward in the reference."""
    if shift_logits:
        peaky_model = make_peaky_model(shift_logits=True, seed=1)  # seed 0 never settles a block cleanly
    gen = torch.Generator().manual_seed(7)
    lengths, G, b = [3, 13, 8], 20, 8
    prompts = random_prompts(lengths, gen)
    ids, plen = left_pad(prompts)
    attention_mask = (torch.arange(ids.shape[1])[None] >= (ids.shape[1] - plen)[:, None]).long()
    kw = {"gen_length": G, "block_length": b, "threshold": 0.6, "editing_threshold": 0.7, "max_post_steps": 4,
              "mbe_window": mbe_window, "eos_token_id": EOS, "mask_token_id": MASK, "attention_mask": attention_mask,
              "draft_ahead": draft_ahead}
    cached = generate(peaky_model, ids, use_cache=True, **kw)
    uncached = generate(peaky_model, ids, use_cache=False, **kw)
    for field in ("sequences", "nfe", "edits", "lengths"):
        assert torch.equal(getattr(cached, field), getattr(uncached, field)), field
    assert cached.edits.sum() > 0 and (cached.nfe < G).any()  # the test exercises edits and parallelism
    saved = 0
    for r, prompt in enumerate(prompts):
        ref = {
            flag: reference_decode(
                peaky_model,
                prompt,
                G=G,
                b=b,
                threshold=0.6,
                editing_threshold=0.7,
                max_post_steps=4,
                mbe_window=mbe_window,
                draft_ahead=flag,
            )
            for flag in (True, False)
        }
        response, nfe, edits = ref[draft_ahead]
        assert cached.sequences[r, ids.shape[1]:].tolist() == response == ref[not draft_ahead][0]
        assert (cached.nfe[r], cached.edits[r]) == (nfe, edits)
        saved += ref[False][1] - ref[True][1]
    assert saved > 0  # some block settled on a clean check, so draft-ahead had a forward to save


def test_rows_stopping_at_eos_leave_the_batch_correctly(peaky_model):
    """A row that stops early is dropped from the batch and its cache rows; the others go on unchanged."""
    gen = torch.Generator().manual_seed(10)
    lengths, G, b, eos = [3, 13, 8, 6], 24, 8, 36  # with this model, eos 36 stops row 2 two blocks early
    prompts = random_prompts(lengths, gen)
    ids, plen = left_pad(prompts)
    kw = {"gen_length": G, "block_length": b, "threshold": 0.6, "editing_threshold": 0.7, "max_post_steps": 4,
              "eos_token_id": eos, "mask_token_id": MASK, "prompt_lengths": plen}
    cached, uncached = generate(peaky_model, ids, **kw), generate(peaky_model, ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences) and torch.equal(cached.nfe, uncached.nfe)
    assert cached.lengths[2] < G - b and cached.lengths[0] == G
    for r, prompt in enumerate(prompts):
        response, nfe, edits = reference_decode(peaky_model, prompt, G=G, b=b, threshold=0.6, editing_threshold=0.7,
                                                max_post_steps=4, eos=eos)
        assert cached.sequences[r, ids.shape[1]:].tolist() == response
        assert (cached.nfe[r], cached.edits[r], cached.lengths[r]) == (nfe, edits, response.index(eos) + 1
                                                                        if eos in response else G)


def test_mbe_without_editing_equals_plain(peaky_model):
    gen = torch.Generator().manual_seed(8)
    ids, plen = left_pad(random_prompts([6, 2], gen))
    kw = {"gen_length": 24, "block_length": 4, "threshold": 0.5, "eos_token_id": EOS, "mask_token_id": MASK,
              "prompt_lengths": plen, "eos_early_stop": False}
    plain = generate(peaky_model, ids, **kw)
    for window in (1, 3):
        mbe = generate(peaky_model, ids, mbe_window=window, **kw)
        assert torch.equal(mbe.sequences, plain.sequences) and torch.equal(mbe.nfe, plain.nfe)


def test_sampling_is_reproducible_and_filtered(peaky_model):
    gen = torch.Generator().manual_seed(9)
    ids, plen = left_pad(random_prompts([5, 9], gen))
    kw = {
        "gen_length": 16,
        "block_length": 8,
        "threshold": 0.5,
        "editing_threshold": 0.6,
        "temperature": 1.5,
        "top_k": 20,
        "top_p": 0.95,
        "eos_token_id": EOS,
        "mask_token_id": MASK,
        "prompt_lengths": plen,
    }
    runs = [generate(peaky_model, ids, generator=torch.Generator().manual_seed(s), **kw).sequences for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])

    logits = torch.randn(4, 6, V, generator=gen)
    banned = logits.index_fill(-1, torch.tensor([MASK]), -math.inf)
    top = banned.topk(5, dim=-1).indices
    for _ in range(20):
        v, p = _pick(logits, MASK, 1.0, 5, None, gen)
        assert (v[..., None] == top).any(-1).all() and (v != MASK).all() and (p > 0).all()
    v, p = _pick(logits, MASK, 1.0, None, 1e-6, gen)  # nucleus of one token: the argmax, p = 1
    greedy = banned.argmax(-1)
    assert torch.equal(v, greedy) and torch.allclose(p, torch.ones_like(p))


def test_modes_and_saved_defaults(tmp_path, peaky_model):
    from transformers import GenerationConfig

    GenerationConfig(**generation_config_dict("Q", gen_length=12, block_length=4)).save_pretrained(tmp_path)
    saved = load_decode_defaults(tmp_path)
    assert saved == {
        "threshold": 0.7,
        "editing_threshold": 0.5,
        "max_post_steps": 16,
        "mbe_window": 0,
        "gen_length": 12,
        "block_length": 4,
    }
    assert load_decode_defaults(tmp_path / "missing") == {}
    ids = torch.randint(2, V, (2, 5))
    out = generate(peaky_model, ids, **mode_params("Q", peaky_model.config, **saved))
    ref = generate(peaky_model, ids, eos_token_id=EOS, mask_token_id=MASK, **saved)
    assert torch.equal(out.sequences, ref.sequences) and out.sequences.shape == (2, 17)
    assert DECODE_PRESETS["llada2.0"] == {"threshold": 0.95, "editing_threshold": None}
    with pytest.raises(ValueError, match="unknown decoding mode"):
        mode_params("fast", peaky_model.config)
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(peaky_model, ids, gen_length=4, block_length=4, threshold=0.5, eos_token_id=EOS,
                 mask_token_id=MASK, attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1] * 5]))


def test_user_settings_are_user_errors_and_call_shapes_are_not(tmp_path, peaky_model):
    """Sampling settings and a saved generation_config.json are the user's (rl config, `generate`
    flags, a model directory): UserError. What our own code hands `generate` (shapes, lengths it
    computed) stays a plain ValueError, a bug with its traceback."""
    from llada_train.decoding import check_sampling
    from llada_train.errors import UserError

    with pytest.raises(UserError, match=r"top_p must be None or in \(0, 1\]"):
        check_sampling(0.5, None, 0.0, None, 1.5)
    with pytest.raises(UserError, match="threshold must be in"):
        generate(peaky_model, torch.randint(2, V, (1, 3)), gen_length=4, block_length=4, threshold=7.0,
                 eos_token_id=EOS, mask_token_id=MASK)
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(UserError, match=r"generation_config\.json: not valid JSON"):
        load_decode_defaults(tmp_path)
    for bad in ({"gen_length": 0}, {"input_ids": torch.zeros(2, 0, dtype=torch.long)}):
        kwargs = {"input_ids": torch.randint(2, V, (1, 3)), "gen_length": 4, **bad}
        with pytest.raises(ValueError) as e:
            generate(peaky_model, kwargs.pop("input_ids"), block_length=4, threshold=0.5, eos_token_id=EOS,
                     mask_token_id=MASK, **kwargs)
        assert not isinstance(e.value, UserError), e.value


def test_complete_decodes_oracle_answer():
    from llada_train.data.tokenizer import load_tokenizer
    from llada_train.decoding import encode_prompts

    tok = load_tokenizer(None)
    answer = tok("The answer is 42.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for prompt in ["What is six times seven?", "Hi"]:
        _, plen = encode_prompts(tok, [prompt], chat=True)
        p = int(plen[0])
        target = torch.full((256,), tok.eos_token_id)
        target[p:p + len(answer)] = torch.tensor(answer)
        oracle = Oracle(target, torch.full((256,), 0.9), vocab=len(tok))
        oracle.config = SimpleNamespace(eos_token_id=tok.eos_token_id, mask_token_id=tok.mask_token_id)
        done = complete(oracle, tok, [prompt], mode="Q", gen_length=16, block_length=8)
        assert done.texts == ["The answer is 42."] and done.token_ids == [answer[:-1]]


def test_cli_writes_jsonl(tmp_path, peaky_model, capsys):
    from llada_train.data.tokenizer import load_tokenizer
    from llada_train.generate_cli import main
    from llada_train.model import LLaDA2MoeModelLM

    tok = load_tokenizer(None)
    torch.manual_seed(0)
    model = LLaDA2MoeModelLM(tiny_config(eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                                         mask_token_id=tok.mask_token_id))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+1="}) + "\n" + json.dumps({"prompt": "abc"}) + "\n")
    main(["--model", str(tmp_path / "m"), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
          "--mode", "S", "--gen-length", "8", "--block-length", "4", "--no-chat"])
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["1+1=", "abc"]
    assert all(isinstance(r["completion"], str) and r["nfe"] >= 1 and r["tokens_per_forward"] > 0 for r in rows)
    main(["--model", str(tmp_path / "m"), "--prompt", "hello", "--gen-length", "8", "--block-length", "4"])
    assert "nfe" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "m")])
