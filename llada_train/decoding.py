"""Threshold decoding for block-diffusion LMs (docs/design.md §6): M2T unmasking + T2T editing.

Block alignment: blocks are aligned to each row's own positions, counted from its first real
token (row position i is in block i // block_length), exactly like SFT's training layout where an
example starts at position 0 and the response starts inside the prompt's last block. The prompt
fills the first blocks; the response is `gen_length` masks right after it; the rest of the last
block (fewer than `block_length` slots) holds fixed EOS, as in SFT's EOS padding. Internally each
row is re-laid out with a whole number of padding blocks on the left so that every row ends at
the same column: row blocks then coincide with physical blocks, the batch walks the blocks in
lockstep, and one KV cache commit per block serves all rows. Position ids ignore the padding.

Per block: v = argmax (or a sample) of the window's logits, p = prob(v);
Γ = masked positions with p > threshold (at least one, or as many as `steps` requires);
Δ = visible response positions of the window with v != x and p > editing_threshold;
x[Γ ∪ Δ] = v. When a row's block has no masks left it keeps stepping while Δ is non-empty, at
most `max_post_steps` times. The window is the current block plus, with Multiple Block Editing
(`mbe_window = N`), the last N finished blocks, which stay editable and are recomputed every step.
Everything left of the window lives in a prefix KV cache; the commit of a block leaving the window
is folded into the next block's first forward (`commit_len`), so no extra forward is spent on it.

Draft-ahead: with editing on, a block ends with a forward whose Δ is empty (nothing left to edit).
That forward also carries the next block's masks: under the block-causal mask they cannot change
the current block's logits, and once the block has settled they see exactly the prefix a fresh
forward would see, so their logits serve as the next block's first step. The output is the same
as without it (up to float rounding), with one forward fewer per settled block.

Edit cycles: greedy post-steps map a window to the next deterministically, so a window that
repeats an earlier state would cycle until `max_post_steps` (S mode's editing threshold 0 lets a
model flip between two tokens forever). The decoder jumps to the state that step would hold and
counts the edits it would have made, without spending the forwards.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .model.attention import BlockKVCache
from .model.masks import AttentionLayout

DECODE_PRESETS = {
    # Speedy: aggressive drafting, every disagreement the model has with its draft is edited.
    "S": {"threshold": 0.5, "editing_threshold": 0.0},
    # Quality: conservative drafting, confident edits only.
    "Q": {"threshold": 0.7, "editing_threshold": 0.5},
    # LLaDA2.0-style M2T only.
    "llada2.0": {"threshold": 0.95, "editing_threshold": None},
}
DEFAULT_GEN_LENGTH = 256
DEFAULT_BLOCK_LENGTH = 32
# generation_config.json keys written by `generation_config_dict` and read by `load_decode_defaults`.
GENERATION_CONFIG_KEYS = ("threshold", "editing_threshold", "max_post_steps", "mbe_window", "gen_length",
                          "block_length")


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # (B, P + gen_length): the prompt as given (left-padded), then the response
    nfe: torch.Tensor  # (B,) model forwards each row needed (what decoding that row alone would take)
    tokens_per_forward: torch.Tensor  # (B,) lengths / nfe
    edits: torch.Tensor  # (B,) T2T edits applied (tokens replaced by Δ)
    lengths: torch.Tensor  # (B,) response tokens up to and including the first EOS (gen_length if none)
    forwards: int = 0  # batched model calls (all rows at once)


def _prompt_lengths(input_ids, attention_mask, prompt_lengths) -> torch.Tensor:
    bsz, width = input_ids.shape
    if prompt_lengths is not None:
        lengths = torch.as_tensor(prompt_lengths, dtype=torch.long, device=input_ids.device).reshape(-1)
        if lengths.numel() != bsz or (lengths < 0).any() or (lengths > width).any():
            raise ValueError(f"prompt_lengths must be {bsz} values in [0, {width}]; got {lengths.tolist()}")
        return lengths
    if attention_mask is None:
        return torch.full((bsz,), width, dtype=torch.long, device=input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be a 2D padding mask shaped like input_ids {tuple(input_ids.shape)}; "
                         f"got {tuple(attention_mask.shape)}")
    valid = attention_mask.bool()
    lengths = valid.sum(1)
    left_padded = torch.arange(width, device=valid.device)[None] >= (width - lengths)[:, None]
    if not torch.equal(valid, left_padded):
        raise ValueError("generate expects LEFT-padded prompts (padding first, then the prompt); the "
                         "attention_mask has padding after real tokens: re-pad with padding_side='left'")
    return lengths


def check_sampling(threshold, editing_threshold, temperature, top_k, top_p) -> None:
    """The unmasking/editing thresholds and sampling filters `generate` accepts (threshold None:
    a preset's, not checked here). They are the user's (rl config, `generate` flags, a saved
    generation_config.json): UserError naming the argument."""
    _raise_first(UserError, [
        (threshold is None or 0.0 <= threshold <= 1.0, f"threshold must be in [0, 1], got {threshold}"),
        (editing_threshold is None or 0.0 <= editing_threshold <= 1.0,
         f"editing_threshold must be None (editing off) or in [0, 1], got {editing_threshold}"),
        (temperature >= 0.0, f"temperature must be >= 0 (0 = greedy), got {temperature}"),
        (top_k is None or top_k >= 1, f"top_k must be None or >= 1, got {top_k}"),
        (top_p is None or 0.0 < top_p <= 1.0, f"top_p must be None or in (0, 1], got {top_p}"),
    ])


def _raise_first(error: type[Exception], checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise error(message)


def _pick(logits, mask_token_id, temperature, top_k, top_p, generator):
    """Candidate tokens v and their probabilities p from (B, W, V) logits; the mask token is never
    a candidate. Sampling draws from the temperature/top-k/top-p filtered distribution."""
    banned = torch.tensor([mask_token_id], device=logits.device)
    logits = logits.float().index_fill(-1, banned, float("-inf"))  # a new tensor: the model's stays intact
    if temperature == 0.0:
        p, v = logits.softmax(-1).max(-1)
        return v, p
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (B, W, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)  # (B, W, V)
    v = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(probs.shape[:-1])
    return v, probs.gather(-1, v[..., None]).squeeze(-1)


def _min_unmask(n_masks, denoise_steps, steps):
    """Masks each row must fill this step: 1, or enough to finish within `steps` denoising steps."""
    if steps is None:
        return (n_masks > 0).long()
    left = (steps - denoise_steps).clamp(min=1)
    return (n_masks + left - 1) // left


class _EditCycles:
    """Greedy post-steps are a deterministic map of a row's window: once the window repeats a state
    it had earlier in this block's post-steps, it cycles until `max_post_steps`. `jump` moves such a
    row straight to the state (and edit count) it would have there, skipping the forwards between."""

    def __init__(self, max_post_steps: int, n_rows: int, width: int, device):
        self.limit = max_post_steps
        self.states = torch.full((max_post_steps + 1, n_rows, width), -1, dtype=torch.long, device=device)
        self.edits = torch.zeros(max_post_steps + 1, n_rows, dtype=torch.long, device=device)

    def record(self, window, post, n_edits, stepping):
        """The window entering post-step number `post` (Ba,) and the edits that step applies, for
        the `stepping` rows."""
        idx = stepping.nonzero().squeeze(1)
        self.states[post[idx], idx] = window[idx].long()
        self.edits[post[idx], idx] = n_edits[idx]

    def jump(self, window, post, stepped):
        """Rows whose new window (after `post` post-steps) repeats an earlier one: their final window,
        the edits the skipped steps would have applied, and the rows."""
        repeat = (self.states == window[None]).all(-1) & (stepped & (post < self.limit))[None]  # (S, Ba)
        rows = repeat.any(0).nonzero().squeeze(1).tolist()
        final, extra = window.clone(), torch.zeros_like(post)
        for r in rows:
            t, i = int(post[r]), int(repeat[:, r].nonzero()[0])
            period = t - i
            final[r] = self.states[i + (self.limit - i) % period, r]
            extra[r] = sum(int(self.edits[i + (step - i) % period, r]) for step in range(t, self.limit))
        return final, extra, torch.tensor(rows, dtype=torch.long, device=window.device)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    *,
    gen_length: int,
    block_length: int,
    threshold: float,
    editing_threshold: float | None = None,
    max_post_steps: int = 16,
    steps: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int,
    mask_token_id: int,
    eos_early_stop: bool = True,
    mbe_window: int = 0,
    use_cache: bool = True,
    draft_ahead: bool = True,
    attention_mask: torch.Tensor | None = None,
    prompt_lengths=None,
    on_block: Callable[[int, torch.Tensor], None] | None = None,
    generator: torch.Generator | None = None,
) -> GenerateOutput:
    """Decode `gen_length` tokens after each (left-padded) prompt row. See the module docstring;
    `mode_params` turns a preset (S, Q, ...) into these keywords.

    `attention_mask` (B, P) or `prompt_lengths` (B,) say how many of the last columns of each row
    are prompt (neither: no padding). `steps` caps the denoising steps per block. A row whose
    finished block holds an EOS in its response stops (`eos_early_stop`); response tokens after
    the first EOS become EOS. `on_block(i, sequences)` is called after the i-th decoded block with
    the current (B, P + gen_length) sequences, undecoded positions still masks (blocks inside the
    MBE window may still change). `draft_ahead=False` spends a separate forward on each block's
    first step (same tokens, more forwards; for comparison). The model runs in eval mode and gets
    its mode back afterwards.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, prompt_len >= 1), got shape {tuple(input_ids.shape)}")
    rules = DecodeRules(gen_length, block_length, threshold, editing_threshold, max_post_steps, steps,
                        (temperature, top_k, top_p, generator), eos_token_id, mask_token_id, eos_early_stop,
                        mbe_window, use_cache, draft_ahead)
    was_training = model.training
    model.eval()
    try:
        plen = _prompt_lengths(input_ids, attention_mask, prompt_lengths)
        return _BlockDecoder(model, input_ids, plen, rules).run(on_block)
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class DecodeRules:
    """`generate`'s settings, validated once."""

    gen_length: int
    block_length: int
    threshold: float
    editing_threshold: float | None
    max_post_steps: int
    steps: int | None
    sampling: tuple  # (temperature, top_k, top_p, generator)
    eos: int
    mask_id: int
    eos_early_stop: bool
    mbe_window: int
    use_cache: bool
    draft_ahead: bool

    def __post_init__(self):
        if self.threshold is None:
            raise ValueError("threshold must be in [0, 1], got None (pick a mode: mode_params)")
        temperature, top_k, top_p, _ = self.sampling
        _raise_first(ValueError, [  # callers check user settings where they read them (generate_cli, config)
            (self.gen_length >= 1, f"gen_length must be >= 1, got {self.gen_length}"),
            (self.block_length >= 1, f"block_length must be >= 1, got {self.block_length}"),
            (self.max_post_steps >= 0, f"max_post_steps must be >= 0, got {self.max_post_steps}"),
            (self.steps is None or self.steps >= 1, f"steps must be None or >= 1, got {self.steps}"),
            (self.mbe_window >= 0, f"mbe_window must be >= 0, got {self.mbe_window}"),
        ])
        check_sampling(self.threshold, self.editing_threshold, temperature, top_k, top_p)

    @property
    def editing(self) -> bool:
        return self.editing_threshold is not None


def row_blocks(prompt_lengths: torch.Tensor, response_lengths, block_length: int) -> torch.Tensor:
    """(B,) blocks a row spans when blocks are aligned to its own positions (its prompt starts at
    position 0, as in SFT): the prompt and `response_lengths` tokens after it."""
    return (prompt_lengths + response_lengths + block_length - 1) // block_length


@dataclass
class RowLayout:
    """Every row ends at the same column: whole padding blocks, the prompt, the response slots,
    EOS to the end of its last block. Row blocks then coincide with physical blocks."""

    x: torch.Tensor  # (B, T) prompt, masks at the response, EOS after it
    response: torch.Tensor  # (B, T) bool: the gen_length response columns
    valid: torch.Tensor  # (B, T) bool: not left padding
    position_ids: torch.Tensor  # (B, T) the row's own positions (0 at its first prompt token)
    resp_idx: torch.Tensor  # (B, G) response columns
    n_blocks: int
    first_block: int  # the first block holding a response slot (of any row)


def row_layout(input_ids: torch.Tensor, plen: torch.Tensor, gen_length: int, b: int, *, eos: int,
               mask_id: int) -> RowLayout:
    device = input_ids.device
    width = input_ids.shape[1]
    n_row_blocks = row_blocks(plen, gen_length, b)  # (B,)
    n_blocks = int(n_row_blocks.max())
    cols = torch.arange(n_blocks * b, device=device)[None]  # (1, T)
    pad = ((n_blocks - n_row_blocks) * b)[:, None]  # (B, 1)
    start = pad + plen[:, None]  # (B, 1) first response column
    is_prompt = (cols >= pad) & (cols < start)  # (B, T)
    response = (cols >= start) & (cols < start + gen_length)  # (B, T)
    src = (cols - pad + (width - plen[:, None])).clamp(0, width - 1)  # caller's column of each prompt token
    x = torch.where(is_prompt, input_ids.gather(1, src), torch.full_like(src, eos))
    x = torch.where(response, torch.full_like(x, mask_id), x)  # (B, T)
    resp_idx = start + torch.arange(gen_length, device=device)[None]  # (B, G)
    return RowLayout(x, response, cols >= pad, (cols - pad).clamp(min=0), resp_idx, n_blocks, int(start.min()) // b)


def unmask_set(is_mask: torch.Tensor, p: torch.Tensor, threshold: float, need: torch.Tensor) -> torch.Tensor:
    """Γ: masked positions whose candidate is more confident than `threshold`, and at least the
    `need` (B,) most confident masked positions of each row. (B, W) bool."""
    conf = torch.where(is_mask, p, torch.full_like(p, -1.0))
    rank = conf.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # 0 = most confident mask
    return is_mask & ((p > threshold) | (rank < need[:, None]))


def edit_set(editable: torch.Tensor, window: torch.Tensor, v: torch.Tensor, p: torch.Tensor,
             editing_threshold: float | None) -> torch.Tensor:
    """Δ: visible response positions whose candidate differs from the current token with
    confidence above `editing_threshold` (editing off: none). (B, W) bool; masks are never in Δ
    (callers pass `editable` without them)."""
    if editing_threshold is None:
        return torch.zeros_like(editable)
    return editable & (v != window) & (p > editing_threshold)


@dataclass
class _BlockSteps:
    """Per-row progress through one block."""

    done: torch.Tensor  # (Ba,) bool
    denoise: torch.Tensor  # (Ba,) denoising steps taken (while masks remained)
    post: torch.Tensor  # (Ba,) post-steps taken (editing with no masks left)
    next_v: torch.Tensor  # (Ba, b) drafts of the next block
    next_p: torch.Tensor  # (Ba, b)
    next_ok: torch.Tensor  # (Ba,) rows whose block settled in a forward that also drafted the next one


class _BlockDecoder:
    """One batched decode: the re-laid-out rows still running, their prefix KV cache and counters.
    Rows that finish leave the batch (and the cache); `out` collects their responses."""

    def __init__(self, model, input_ids: torch.Tensor, plen: torch.Tensor, rules: DecodeRules):
        self.model, self.input_ids, self.r = model, input_ids, rules
        self.lay = row_layout(input_ids, plen, rules.gen_length, rules.block_length, eos=rules.eos,
                              mask_id=rules.mask_id)
        bsz, device = input_ids.shape[0], input_ids.device
        self.nfe = torch.zeros(bsz, dtype=torch.long, device=device)
        self.edits = torch.zeros(bsz, dtype=torch.long, device=device)
        self.out = torch.full((bsz, rules.gen_length), rules.eos, dtype=input_ids.dtype, device=device)
        self.rows = torch.arange(bsz, device=device)  # original index of each active row
        self.cache = BlockKVCache() if rules.use_cache else None
        self.cache_len, self.forwards = 0, 0

    def run(self, on_block) -> GenerateOutput:
        ahead = None  # drafts of the next block from the forward that settled this one
        for k in range(self.lay.first_block, self.lay.n_blocks):
            ahead = self._decode_block(k, ahead)
            if on_block is not None:
                on_block(k - self.lay.first_block, self._sequences_now())
            ahead = self._retire_finished(k, ahead)
            if not len(self.rows):
                break
        return self._output()

    def _answered(self, hi: int) -> torch.Tensor:
        """(Ba,) rows whose response holds an EOS left of column `hi`."""
        return ((self.lay.x[:, :hi] == self.r.eos) & self.lay.response[:, :hi]).any(1)

    def _sequences_now(self) -> torch.Tensor:
        full = self.out.clone()
        full[self.rows] = self.lay.x.gather(1, self.lay.resp_idx)
        return torch.cat([self.input_ids, full], dim=1)

    def _decode_block(self, k: int, drafted):
        """Step block k (with the MBE window before it) until every row has settled it."""
        r, lay, b = self.r, self.lay, self.r.block_length
        lo, hi = max(k - r.mbe_window, lay.first_block) * b, (k + 1) * b  # the window: editable, recomputed
        n, device = len(self.rows), lay.x.device
        has_masks = (lay.x[:, k * b:hi] == r.mask_id).any(1)
        state = _BlockSteps(done=~has_masks & ~(lay.response[:, lo:hi].any(1) & r.editing),
                            denoise=torch.zeros(n, dtype=torch.long, device=device),
                            post=torch.zeros(n, dtype=torch.long, device=device),
                            next_v=torch.zeros(n, b, dtype=lay.x.dtype, device=device),
                            next_p=torch.zeros(n, b, device=device), next_ok=torch.zeros(n, dtype=torch.bool,
                                                                                         device=device))
        cycles = _EditCycles(r.max_post_steps, n, hi - lo, device) if r.editing and r.sampling[0] == 0.0 else None
        first_forward = True
        while not bool(state.done.all()):
            working = ~state.done
            if drafted is not None:
                # This block's first step for the rows in `drafted`, from the logits of the forward that
                # settled the previous block: it saw exactly the prefix a new forward would see, at no cost.
                draft_v, draft_p, draft_ok = drafted  # (Ba, b), (Ba, b), (Ba,)
                v = lay.x[:, lo:hi].clone()
                p = torch.zeros(v.shape, device=device)
                v[:, -b:], p[:, -b:] = draft_v, draft_p
                working &= draft_ok
                drafted, ahead = None, None
            else:
                v, p, ahead = self._forward(k, lo, hi, working, first_forward)
                first_forward = False
                self.nfe[self.rows] += working.long()
            self._step(state, lo, hi, v, p, working, cycles, ahead)
        return (state.next_v, state.next_p, state.next_ok) if bool(state.next_ok.any()) else None

    def _forward(self, k: int, lo: int, hi: int, working: torch.Tensor, first_forward: bool):
        """Candidates v, p for the window, and (v, p) of the next block when the forward drafts it
        (a row that may settle now, editing on, draft-ahead on)."""
        r, lay, b = self.r, self.lay, self.r.block_length
        verifying = working & ~(lay.x[:, k * b:hi] == r.mask_id).any(1)
        if r.eos_early_stop:
            verifying &= ~self._answered(hi)  # it stops after this block
        end = hi + b if r.draft_ahead and r.editing and hi < lay.x.shape[1] and bool(verifying.any()) else hi
        q0 = self.cache_len if r.use_cache else 0
        commit = lo - self.cache_len if (r.use_cache and first_forward) else 0
        logits = self.model(
            input_ids=lay.x[:, q0:end], position_ids=lay.position_ids[:, q0:end],
            attention_mask=AttentionLayout("block_causal", end, b, pad_mask=lay.valid[:, :end], q_start=q0),
            past_key_values=self.cache, use_cache=commit > 0, commit_len=commit, logits_to_keep=end - lo,
        ).logits  # (Ba, end - lo, V)
        self.forwards += 1
        self.cache_len += commit
        v, p = _pick(logits, r.mask_id, *r.sampling)  # (Ba, end - lo)
        return v[:, :hi - lo], p[:, :hi - lo], (v[:, hi - lo:], p[:, hi - lo:])

    def _step(self, state: _BlockSteps, lo: int, hi: int, v, p, working, cycles, ahead) -> None:
        """x[Γ ∪ Δ] = v for the working rows; counters, edit-cycle jumps and settling."""
        r, lay, b = self.r, self.lay, self.r.block_length
        window = lay.x[:, lo:hi]  # (Ba, W)
        is_mask = window == r.mask_id
        n_masks = is_mask.sum(1)
        in_post = working & (n_masks == 0)
        gamma = unmask_set(is_mask, p, r.threshold, _min_unmask(n_masks, state.denoise, r.steps)) & working[:, None]
        delta = edit_set(lay.response[:, lo:hi] & ~is_mask, window, v, p, r.editing_threshold) & working[:, None]
        stepping = in_post & delta.any(1)
        if cycles is not None:
            cycles.record(window, state.post, delta.sum(1), stepping)
        lay.x[:, lo:hi] = torch.where(gamma | delta, v, window)
        self.edits[self.rows] += delta.sum(1)
        state.denoise += (working & (n_masks > 0)).long()
        state.post += stepping.long()
        if cycles is not None and bool(stepping.any()):  # only a post-step that edited can close a cycle
            final, extra, cycling = cycles.jump(lay.x[:, lo:hi], state.post, stepping)
            if len(cycling):
                lay.x[cycling, lo:hi] = final[cycling]
                self.edits[self.rows[cycling]] += extra[cycling]
                state.post[cycling] = r.max_post_steps
        masks_left = (lay.x[:, hi - b:hi] == r.mask_id).any(1)
        if r.editing:
            settled = (state.post >= r.max_post_steps) | in_post & ~delta.any(1)
        else:
            settled = torch.ones_like(state.done)
        state.done |= working & ~masks_left & settled
        if ahead is not None and ahead[0].shape[1]:
            clean = in_post & ~delta.any(1)  # nothing changed: the drafts of the next block stay valid
            state.next_v = torch.where(clean[:, None], ahead[0], state.next_v)
            state.next_p = torch.where(clean[:, None], ahead[1], state.next_p)
            state.next_ok |= clean

    def _retire_finished(self, k: int, ahead):
        """Rows that stop after block k (the last block, or an EOS with eos_early_stop) write their
        response to `out` and leave the batch, their cache rows and the next block's drafts."""
        lay = self.lay
        last = k == lay.n_blocks - 1
        stop = torch.full((len(self.rows),), last, dtype=torch.bool, device=lay.x.device)
        if self.r.eos_early_stop and not last:
            stop |= self._answered((k + 1) * self.r.block_length)
        if not bool(stop.any()):
            return ahead
        self.out[self.rows[stop]] = lay.x[stop].gather(1, lay.resp_idx[stop])
        keep = ~stop
        if not bool(keep.any()):
            self.rows = self.rows[keep]
            return None
        lay.x, lay.response, lay.resp_idx = lay.x[keep], lay.response[keep], lay.resp_idx[keep]
        lay.valid, lay.position_ids, self.rows = lay.valid[keep], lay.position_ids[keep], self.rows[keep]
        if self.cache is not None:
            self.cache.select_rows(keep.nonzero().squeeze(1))
        return None if ahead is None else tuple(t[keep] for t in ahead)

    def _output(self) -> GenerateOutput:
        """Statistics; everything after the first EOS of a response is EOS."""
        out, eos, gen_length = self.out, self.r.eos, self.r.gen_length
        is_eos = (out == eos) | (out == self.r.mask_id)  # masks remain only after an early stop
        first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(self.nfe, gen_length))
        after = torch.arange(gen_length, device=out.device)[None] > first_eos[:, None]
        out = out.masked_fill(after | (out == self.r.mask_id), eos)
        lengths = (first_eos + 1).clamp(max=gen_length)
        return GenerateOutput(sequences=torch.cat([self.input_ids, out], dim=1), nfe=self.nfe,
                              tokens_per_forward=lengths.float() / self.nfe.clamp(min=1).float(),
                              edits=self.edits, lengths=lengths, forwards=self.forwards)


# ---- modes, saved defaults, text helper ---------------------------------------------------------


def _mode_params(mode: str) -> dict:
    if mode not in DECODE_PRESETS:
        raise ValueError(f"unknown decoding mode {mode!r}; choose one of {sorted(DECODE_PRESETS)}")
    return dict(DECODE_PRESETS[mode])


def mode_params(mode: str, model_config, **overrides) -> dict:
    """`generate` keywords for a preset (`DECODE_PRESETS`); any `generate` keyword overrides it.
    Token ids default to `model_config`'s, lengths to 256 / 32."""
    params = dict(gen_length=DEFAULT_GEN_LENGTH, block_length=DEFAULT_BLOCK_LENGTH, **_mode_params(mode))
    params["eos_token_id"] = getattr(model_config, "eos_token_id", None)
    params["mask_token_id"] = getattr(model_config, "mask_token_id", None)
    params.update(overrides)
    for key in ("eos_token_id", "mask_token_id"):
        if params[key] is None:
            raise UserError(f"{key} is not set in the model's config (config.json); set it there or pass {key}=...")
    return params


def generation_config_dict(mode: str = "Q", *, gen_length: int = DEFAULT_GEN_LENGTH,
                           block_length: int = DEFAULT_BLOCK_LENGTH) -> dict:
    """Decoding defaults to save with an HF export: `transformers.GenerationConfig(**d).save_pretrained(dir)`.

    Keys: `decode_mode` (preset name), `threshold`, `editing_threshold` (None = off), `max_post_steps`,
    `mbe_window`, `gen_length`, `block_length`. Greedy decoding is implied (no `temperature` key:
    GenerationConfig rejects temperature=0)."""
    params = _mode_params(mode)
    return {"decode_mode": mode, "threshold": params["threshold"], "editing_threshold": params["editing_threshold"],
                "max_post_steps": 16, "mbe_window": 0, "gen_length": gen_length, "block_length": block_length}


def load_decode_defaults(model_dir) -> dict:
    """`generate` keywords saved in `model_dir/generation_config.json` ({} when there are none)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); fix or delete the file") from e
    return {key: saved[key] for key in GENERATION_CONFIG_KEYS if key in saved}


def saved_decode_settings(model_dir, mode: str | None = None) -> dict:
    """Decoding settings, weakest first: built-in defaults (Q mode, 256 tokens, blocks of 32) < the
    export's generation_config.json < `mode`'s thresholds. `mode` in the result names the preset."""
    params = dict(gen_length=DEFAULT_GEN_LENGTH, block_length=DEFAULT_BLOCK_LENGTH, max_post_steps=16,
                  mbe_window=0, **DECODE_PRESETS["Q"])
    params.update(load_decode_defaults(model_dir))
    if mode:
        params.update(_mode_params(mode))
    params["mode"] = mode or _saved_mode(model_dir)
    return params


def _saved_mode(model_dir) -> str:
    path = Path(model_dir) / "generation_config.json"
    saved = json.loads(path.read_text()).get("decode_mode") if path.exists() else None
    return saved if saved in DECODE_PRESETS else "Q"


def encode_prompts(tokenizer, prompts: list, *, chat: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (B, P) prompt ids and their (B,) lengths. With `chat`, each prompt (a string =
    one user turn, or a list of messages) is rendered with the chat template, generation header
    included; tokens are encoded without extra special tokens, exactly as in SFT."""
    if chat:
        from .data.chat import render_prompt

        prompts = [render_prompt(p, tokenizer) for p in prompts]
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    width = max(1, max(len(i) for i in ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = torch.full((len(ids), width), pad_id, dtype=torch.long)
    for r, row in enumerate(ids):
        if row:
            batch[r, width - len(row):] = torch.tensor(row)
    return batch, torch.tensor([len(i) for i in ids])


def response_ids(responses: torch.Tensor, lengths: torch.Tensor, eos_token_id: int) -> list[list[int]]:
    """Each (B, G) response's tokens before its first EOS (`lengths` count the EOS)."""
    return [[t for t in row[:n] if t != eos_token_id] for row, n in
            zip(responses.tolist(), lengths.tolist(), strict=True)]


def decode_responses(tokenizer, responses: torch.Tensor, lengths: torch.Tensor, eos_token_id: int) -> list[str]:
    """Response texts: tokens before the first EOS, special tokens (role markers) dropped."""
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in response_ids(responses, lengths, eos_token_id)]


@dataclass
class Completions:
    texts: list[str]  # response text before the first EOS, special tokens dropped
    token_ids: list[list[int]]  # response tokens before the first EOS
    tokens_per_forward: list[float]  # per prompt
    nfe: list[int] = field(default_factory=list)  # model forwards per prompt
    edits: list[int] = field(default_factory=list)  # T2T edits per prompt


def complete(model, tokenizer, prompts: list, *, mode: str = "Q", gen_length: int = DEFAULT_GEN_LENGTH,
             block_length: int = DEFAULT_BLOCK_LENGTH, chat: bool = True, batch_size: int = 16,
             **overrides) -> Completions:
    """One greedy (unless overridden) completion per prompt, in batches of `batch_size`: the loop
    behind evaluation in SFT, RL and the report."""
    device = next(model.parameters(), torch.empty(0)).device
    eos = overrides.get("eos_token_id", model.config.eos_token_id)
    done = Completions([], [], [])
    for i in range(0, len(prompts), batch_size):
        input_ids, lengths = encode_prompts(tokenizer, prompts[i:i + batch_size], chat=chat)  # (b, P), (b,)
        params = mode_params(mode, model.config, gen_length=gen_length, block_length=block_length, **overrides)
        out = generate(model, input_ids.to(device), prompt_lengths=lengths.to(device), **params)
        responses = out.sequences[:, input_ids.shape[1]:]
        done.texts += decode_responses(tokenizer, responses, out.lengths, eos)
        done.token_ids += response_ids(responses, out.lengths, eos)
        done.tokens_per_forward += out.tokens_per_forward.tolist()
        done.nfe += out.nfe.tolist()
        done.edits += out.edits.tolist()
    return done
