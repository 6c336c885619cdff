"""Threshold decoding for block-diffusion LMs (DESIGN §6): M2T unmasking + T2T editing.

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


def _validate(gen_length, block_length, threshold, editing_threshold, max_post_steps, steps, temperature,
              top_k, top_p, mbe_window):
    checks = [
        (gen_length >= 1, f"gen_length must be >= 1, got {gen_length}"),
        (block_length >= 1, f"block_length must be >= 1, got {block_length}"),
        (0.0 <= threshold <= 1.0, f"threshold must be in [0, 1], got {threshold}"),
        (editing_threshold is None or 0.0 <= editing_threshold <= 1.0,
         f"editing_threshold must be None (editing off) or in [0, 1], got {editing_threshold}"),
        (max_post_steps >= 0, f"max_post_steps must be >= 0, got {max_post_steps}"),
        (steps is None or steps >= 1, f"steps must be None or >= 1, got {steps}"),
        (temperature >= 0.0, f"temperature must be >= 0 (0 = greedy), got {temperature}"),
        (top_k is None or top_k >= 1, f"top_k must be None or >= 1, got {top_k}"),
        (top_p is None or 0.0 < top_p <= 1.0, f"top_p must be None or in (0, 1], got {top_p}"),
        (mbe_window >= 0, f"mbe_window must be >= 0, got {mbe_window}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


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
    """Decode `gen_length` tokens after each (left-padded) prompt row. See the module docstring.

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
    _validate(gen_length, block_length, threshold, editing_threshold, max_post_steps, steps, temperature,
              top_k, top_p, mbe_window)
    was_training = model.training
    model.eval()
    try:
        return _generate(model, input_ids, _prompt_lengths(input_ids, attention_mask, prompt_lengths),
                         gen_length=gen_length, b=block_length, threshold=threshold,
                         editing_threshold=editing_threshold, max_post_steps=max_post_steps, steps=steps,
                         sampling=(temperature, top_k, top_p, generator), eos=eos_token_id,
                         mask_id=mask_token_id, eos_early_stop=eos_early_stop, mbe_window=mbe_window,
                         use_cache=use_cache, draft_ahead=draft_ahead, on_block=on_block)
    finally:
        model.train(was_training)


def _generate(model, input_ids, plen, *, gen_length, b, threshold, editing_threshold, max_post_steps, steps,
              sampling, eos, mask_id, eos_early_stop, mbe_window, use_cache, draft_ahead, on_block):
    device = input_ids.device
    bsz, width = input_ids.shape
    editing = editing_threshold is not None
    greedy = sampling[0] == 0.0

    # ---- layout: whole padding blocks, prompt, gen_length masks, EOS to the end of the last block
    n_row_blocks = (plen + gen_length + b - 1) // b  # (B,)
    n_blocks = int(n_row_blocks.max())
    total = n_blocks * b
    cols = torch.arange(total, device=device)[None]  # (1, T)
    pad = ((n_blocks - n_row_blocks) * b)[:, None]  # (B, 1)
    start = pad + plen[:, None]  # (B, 1) first response column
    is_prompt = (cols >= pad) & (cols < start)  # (B, T)
    response = (cols >= start) & (cols < start + gen_length)  # (B, T)
    src = (cols - pad + (width - plen[:, None])).clamp(0, width - 1)  # caller's column of each prompt token
    x = torch.where(is_prompt, input_ids.gather(1, src), torch.full_like(src, eos))
    x = torch.where(response, torch.full_like(x, mask_id), x)  # (B, T)
    valid = cols >= pad  # (B, T)
    position_ids = (cols - pad).clamp(min=0)  # (B, T)
    resp_idx = start + torch.arange(gen_length, device=device)[None]  # (B, G) response columns

    nfe = torch.zeros(bsz, dtype=torch.long, device=device)
    edits = torch.zeros(bsz, dtype=torch.long, device=device)
    out = torch.full((bsz, gen_length), eos, dtype=input_ids.dtype, device=device)
    rows = torch.arange(bsz, device=device)  # original index of each active row
    cache = BlockKVCache() if use_cache else None
    cache_len, forwards = 0, 0
    first_block = int(start.min()) // b

    def answered(hi):
        """(Ba,) rows whose response holds an EOS left of column `hi`."""
        return ((x[:, :hi] == eos) & response[:, :hi]).any(1)

    def sequences_now():
        full = out.clone()
        full[rows] = x.gather(1, resp_idx)
        return torch.cat([input_ids, full], dim=1)

    ahead = None  # drafts of the next block from the forward that settled this one: (v, p, rows it is valid for)
    for k in range(first_block, n_blocks):
        lo = max(k - mbe_window, first_block) * b  # window start: editable, recomputed every step
        hi = (k + 1) * b
        editable = response[:, lo:hi]  # (Ba, W)
        denoise = torch.zeros(len(rows), dtype=torch.long, device=device)
        post = torch.zeros_like(denoise)
        has_masks = (x[:, k * b:hi] == mask_id).any(1)
        done = ~has_masks & ~(editable.any(1) & editing)
        drafted, ahead = ahead, None
        next_v = torch.zeros(len(rows), b, dtype=x.dtype, device=device)  # (Ba, b)
        next_p = torch.zeros(len(rows), b, device=device)  # (Ba, b)
        next_ok = torch.zeros_like(done)  # rows whose block settled in a forward that also drafted block k + 1
        cycles = _EditCycles(max_post_steps, len(rows), hi - lo, device) if editing and greedy else None
        first_forward = True
        while not bool(done.all()):
            working = ~done
            xw = x[:, lo:hi]
            if drafted is not None:
                # This block's first step for the rows in `drafted`, from the logits of the forward that
                # settled the previous block: it saw exactly the prefix a new forward would see, at no cost.
                draft_v, draft_p, draft_ok = drafted  # (Ba, b), (Ba, b), (Ba,)
                v, p = xw.clone(), torch.zeros(xw.shape, device=device)
                v[:, -b:], p[:, -b:] = draft_v, draft_p
                working &= draft_ok
                drafted, ahead_v = None, None
            else:
                verifying = working & ~(x[:, k * b:hi] == mask_id).any(1)
                if eos_early_stop:
                    verifying &= ~answered(hi)  # it stops after this block
                end = hi + b if draft_ahead and editing and hi < total and bool(verifying.any()) else hi
                q0 = cache_len if use_cache else 0
                commit = lo - cache_len if (use_cache and first_forward) else 0
                logits = model(
                    input_ids=x[:, q0:end], position_ids=position_ids[:, q0:end],
                    attention_mask=AttentionLayout("block_causal", end, b, pad_mask=valid[:, :end], q_start=q0),
                    past_key_values=cache, use_cache=commit > 0, commit_len=commit, logits_to_keep=end - lo,
                ).logits  # (Ba, end - lo, V)
                forwards += 1
                cache_len += commit
                first_forward = False
                v, p = _pick(logits, mask_id, *sampling)  # (Ba, end - lo)
                v, p, ahead_v, ahead_p = v[:, :hi - lo], p[:, :hi - lo], v[:, hi - lo:], p[:, hi - lo:]
                nfe[rows] += working.long()
            is_mask = xw == mask_id
            n_masks = is_mask.sum(1)
            in_post = working & (n_masks == 0)

            conf = torch.where(is_mask, p, torch.full_like(p, -1.0))
            rank = conf.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # 0 = most confident mask
            need = _min_unmask(n_masks, denoise, steps)
            gamma = is_mask & ((p > threshold) | (rank < need[:, None])) & working[:, None]
            if editing:
                delta = editable & ~is_mask & (v != xw) & (p > editing_threshold) & working[:, None]
            else:
                delta = torch.zeros_like(gamma)
            stepping = in_post & delta.any(1)
            if cycles is not None:
                cycles.record(xw, post, delta.sum(1), stepping)
            x[:, lo:hi] = torch.where(gamma | delta, v, xw)

            edits[rows] += delta.sum(1)
            denoise += (working & (n_masks > 0)).long()
            post += stepping.long()
            if cycles is not None and bool(stepping.any()):  # only a post-step that edited can close a cycle
                final, extra, cycling = cycles.jump(x[:, lo:hi], post, stepping)
                if len(cycling):
                    x[cycling, lo:hi] = final[cycling]
                    edits[rows[cycling]] += extra[cycling]
                    post[cycling] = max_post_steps
            masks_left = (x[:, k * b:hi] == mask_id).any(1)
            settled = (post >= max_post_steps) | in_post & ~delta.any(1) if editing else torch.ones_like(done)
            done = done | (working & ~masks_left & settled)
            if ahead_v is not None and ahead_v.shape[1]:
                clean = in_post & ~delta.any(1)  # nothing changed: the drafts of block k + 1 stay valid
                next_v = torch.where(clean[:, None], ahead_v, next_v)
                next_p = torch.where(clean[:, None], ahead_p, next_p)
                next_ok |= clean
        if bool(next_ok.any()):
            ahead = (next_v, next_p, next_ok)

        last = k == n_blocks - 1
        stop = torch.full_like(done, last)
        if eos_early_stop and not last:
            stop |= answered(hi)
        if on_block is not None:
            on_block(k - first_block, sequences_now())
        if bool(stop.any()):
            out[rows[stop]] = x[stop].gather(1, resp_idx[stop])
            keep = ~stop
            if not bool(keep.any()):
                break
            x, response, resp_idx = x[keep], response[keep], resp_idx[keep]
            valid, position_ids, rows = valid[keep], position_ids[keep], rows[keep]
            if cache is not None:
                cache.select_rows(keep.nonzero().squeeze(1))
            if ahead is not None:
                ahead = tuple(t[keep] for t in ahead)

    # ---- statistics; everything after the first EOS of a response is EOS
    is_eos = (out == eos) | (out == mask_id)  # masks remain only after an early stop
    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(nfe, gen_length))
    after = torch.arange(gen_length, device=device)[None] > first_eos[:, None]
    out = out.masked_fill(after | (out == mask_id), eos)
    lengths = (first_eos + 1).clamp(max=gen_length)
    return GenerateOutput(
        sequences=torch.cat([input_ids, out], dim=1),
        nfe=nfe,
        tokens_per_forward=lengths.float() / nfe.clamp(min=1).float(),
        edits=edits,
        lengths=lengths,
        forwards=forwards,
    )


# ---- modes, saved defaults, text helper ---------------------------------------------------------


def _mode_params(mode: str) -> dict:
    if mode not in DECODE_PRESETS:
        raise ValueError(f"unknown decoding mode {mode!r}; choose one of {sorted(DECODE_PRESETS)}")
    return dict(DECODE_PRESETS[mode])


def generate_with_mode(model, input_ids: torch.Tensor, mode: str = "S", **overrides) -> GenerateOutput:
    """`generate` with a preset (`DECODE_PRESETS`); any `generate` keyword overrides it. Token ids
    default to `model.config`, lengths to 256 / 32."""
    params = dict(gen_length=DEFAULT_GEN_LENGTH, block_length=DEFAULT_BLOCK_LENGTH, **_mode_params(mode))
    params["eos_token_id"] = getattr(model.config, "eos_token_id", None)
    params["mask_token_id"] = getattr(model.config, "mask_token_id", None)
    params.update(overrides)
    for key in ("eos_token_id", "mask_token_id"):
        if params[key] is None:
            raise ValueError(f"{key} is not set in the model config; pass {key}=...")
    return generate(model, input_ids, **params)


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
        raise ValueError(f"{path}: not valid JSON ({e}); fix or delete the file") from e
    return {key: saved[key] for key in GENERATION_CONFIG_KEYS if key in saved}


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


def decode_responses(tokenizer, output: GenerateOutput, prompt_width: int, eos_token_id: int) -> list[str]:
    """Response texts: tokens before the first EOS, special tokens (role markers) dropped."""
    texts = []
    for row, n in zip(output.sequences[:, prompt_width:].tolist(), output.lengths.tolist(), strict=True):
        row = row[:n]
        if row and row[-1] == eos_token_id:
            row = row[:-1]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


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
        out = generate_with_mode(model, input_ids.to(device), mode, gen_length=gen_length,
                                 block_length=block_length, prompt_lengths=lengths.to(device), **overrides)
        done.texts += decode_responses(tokenizer, out, input_ids.shape[1], eos)
        done.token_ids += [[t for t in row[:n] if t != eos] for row, n in
                           zip(out.sequences[:, input_ids.shape[1]:].tolist(), out.lengths.tolist(), strict=True)]
        done.tokens_per_forward += out.tokens_per_forward.tolist()
        done.nfe += out.nfe.tolist()
        done.edits += out.edits.tolist()
    return done


def generate_text(model, tokenizer, prompts: list, **kwargs) -> list[str]:
    """Completion texts only (`complete`'s keywords: mode, gen_length, block_length, chat, ...)."""
    return complete(model, tokenizer, prompts, **kwargs).texts
