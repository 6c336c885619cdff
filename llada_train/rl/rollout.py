"""Rollouts for EBPO (docs/design.md §7): G completions per prompt with the threshold decoder, in-process or
in Ray actors.

The unit of work is a *chunk*: `prompts_per_chunk` prompts × G rows decoded as one batch with a
generator seeded from (seed, step, chunk index). Chunks are cut and seeded the same way whoever
decodes them, so in-process mode, one Ray worker or many produce the same rollouts, and a chunk
lost with a dead actor is re-run on a fresh actor with the same result.

Ray topology: the driver (learner) publishes its weights once per update with `ray.put`; each
`RolloutWorker` actor holds a model copy and loads a new version before its next chunk. Chunks are
handed out one at a time to idle actors (load balancing); an actor that dies is replaced and its
chunk retried. Reward functions run as Ray tasks with per-call timeouts (`ray_reward_executor`).
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..decoding import decode_responses, encode_prompts, generate, mode_params, response_ids, row_blocks
from .reward_calls import RewardError, RewardSpec, Scores, call_reward


@dataclass
class RolloutChunk:
    """What one decode call gets: prompt rows already repeated G times (adjacent)."""

    index: int  # position of the chunk in the step's batch
    input_ids: torch.Tensor  # (C*G, P) left-padded prompts
    prompt_lengths: torch.Tensor  # (C*G,)
    seed: int  # sampling generator seed, from (run seed, step, chunk index)


@dataclass
class RolloutBatch:
    """A step's rollouts in the SFT layout, i.e. as the decoder saw them: each row is the prompt, the
    `gen_length` response slots (EOS after the first EOS), EOS to the end of the row's last block,
    then padding to the batch width; rows are prompts × G with each prompt's completions adjacent."""

    input_ids: torch.Tensor  # (B, L)
    response_mask: torch.Tensor  # (B, L) bool: everything after the prompt up to the row's last block end
    pad_mask: torch.Tensor  # (B, L) bool: real tokens
    completions: list[str]  # (B,) response texts (special tokens dropped, EOS cut)
    completion_ids: list[list[int]]  # (B,) response token ids without the EOS
    lengths: torch.Tensor  # (B,) response tokens including the EOS (gen_length when none)
    nfe: torch.Tensor  # (B,) model forwards each row needed
    seconds: float  # wall time of the decoding

    @property
    def tokens_per_forward(self) -> float:
        return (self.lengths.float() / self.nfe.clamp_min(1).float()).mean().item()


def stable_seed(*parts) -> int:
    """A 63-bit seed from `parts`, the same in every process (str hashing is salted per process)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    return stable_seed(seed, step, chunk, "rollout")


def decode_chunk(model, chunk: RolloutChunk, decode: dict) -> dict:
    """Decode one chunk: `decode` = {"mode": preset, **generate overrides}. Returns CPU tensors."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(chunk.seed)
    params = dict(decode)
    params = mode_params(params.pop("mode"), model.config, **params)
    out = generate(model, chunk.input_ids.to(device), prompt_lengths=chunk.prompt_lengths.to(device),
                   generator=generator, **params)
    width = chunk.input_ids.shape[1]
    return {"index": chunk.index, "responses": out.sequences[:, width:].cpu(), "lengths": out.lengths.cpu(),
            "nfe": out.nfe.cpu()}


class RolloutWorker:
    """A model copy and the decoder; `ray.remote(RolloutWorker)` makes it a rollout actor."""

    def __init__(self, model_config, decode: dict, threads: int = 1):
        from ..model import LLaDA2MoeModelLM

        torch.set_num_threads(threads)
        self.model = LLaDA2MoeModelLM(model_config).eval()
        self.decode = decode
        self.version = None

    def load_weights(self, version: int, state_dict: dict) -> int:
        if version != self.version:
            self.model.load_state_dict(state_dict)
            self.version = version
        return version

    def rollout(self, chunk: RolloutChunk) -> dict:
        return decode_chunk(self.model, chunk, self.decode)


# ----------------------------------------------------------------------------- executors


class LocalRollouts:
    """In-process mode: the learner's own model decodes every chunk in order. A sharded learner
    (ZeRO-3 over several ranks, or expert parallelism) decodes with a plain full copy instead,
    gathered once per publish: each rank then takes as many decoder forwards as its prompts need,
    which sharded forwards (every rank in every gather and all-to-all) cannot."""

    def __init__(self, model, decode: dict):
        self.model, self.decode = model, decode
        self._copy = None

    def publish(self, source) -> None:
        """`source`: the learner's model (nothing to send), or its Engine (a full copy when sharded;
        a collective then, so every rank calls it)."""
        if not getattr(source, "sharded", False):
            self.model = getattr(source, "module", source)
            return
        state = source.full_state_dict()
        if self._copy is None:
            from ..model import LLaDA2MoeModelLM

            device = next(source.parameters()).device
            dtype = next(v.dtype for v in state.values() if v.is_floating_point())
            self._copy = LLaDA2MoeModelLM(source.config).to(device=device, dtype=dtype).eval()
        self._copy.load_state_dict(state)
        self.model = self._copy

    def run(self, chunks: list[RolloutChunk], on_result: Callable | None = None) -> list[dict]:
        results = []
        for chunk in chunks:
            results.append(decode_chunk(self.model, chunk, self.decode))
            if on_result is not None:
                on_result(chunk.index, 0)
        return results

    def close(self) -> None:
        pass


def init_ray(rcfg) -> bool:
    """Start a local Ray (`address` empty) or join one (`auto` / an address); True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    if rcfg.address:
        ray.init(address=rcfg.address, log_to_driver=False)
    else:
        num_cpus = rcfg.num_cpus or math.ceil(rcfg.num_workers * rcfg.cpus_per_worker) + 1
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return True


class RayRollouts:
    """`num_workers` RolloutWorker actors; chunks go to idle actors, dead actors are replaced and their
    chunk retried (at most `max_chunk_retries` times per chunk)."""

    def __init__(self, rcfg, model_config, decode: dict):
        import ray

        self.owns_ray = init_ray(rcfg)
        threads = max(1, int(rcfg.cpus_per_worker))
        self._actor = ray.remote(num_cpus=rcfg.cpus_per_worker, max_restarts=0)(RolloutWorker)
        self._args = (model_config, decode, threads)
        self.max_chunk_retries = rcfg.max_chunk_retries
        self.workers = [self._actor.remote(*self._args) for _ in range(rcfg.num_workers)]
        self.loaded = [None] * len(self.workers)  # weight version each actor has been sent
        self.version, self.weights = None, None
        self.restarts = 0

    def publish(self, source) -> None:
        """One `ray.put` of the learner's weights (a model, or an Engine: its full weights, ZeRO-3
        partitions gathered); actors load them before their next chunk."""
        import ray

        weights = source.full_state_dict() if hasattr(source, "full_state_dict") else source.state_dict()
        state = {k: v.detach().cpu().clone() for k, v in weights.items()}
        self.weights = ray.put(state)
        self.version = 0 if self.version is None else self.version + 1

    def _submit(self, w: int, chunk: RolloutChunk):
        if self.loaded[w] != self.version:
            self.workers[w].load_weights.remote(self.version, self.weights)  # actor calls run in order
            self.loaded[w] = self.version
        return self.workers[w].rollout.remote(chunk)

    def _restart(self, w: int) -> None:
        import ray

        ray.kill(self.workers[w], no_restart=True)
        self.workers[w] = self._actor.remote(*self._args)
        self.loaded[w] = None
        self.restarts += 1

    def run(self, chunks: list[RolloutChunk], on_result: Callable | None = None) -> list[dict]:
        """Results in chunk order. `on_result(chunk_index, worker_index)` is called as chunks finish."""
        import ray
        from ray.exceptions import RayActorError

        if self.weights is None:
            raise RuntimeError("RayRollouts.run before publish(): the actors have no weights")
        pending, results, tries = deque(range(len(chunks))), {}, {}
        idle, inflight = list(range(len(self.workers))), {}
        while pending or inflight:
            while pending and idle:
                w, c = idle.pop(0), pending.popleft()
                inflight[self._submit(w, chunks[c])] = (w, c)
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            w, c = inflight.pop(ref)
            try:
                results[c] = ray.get(ref)
            except RayActorError as e:
                tries[c] = tries.get(c, 0) + 1
                if tries[c] > self.max_chunk_retries:
                    raise RuntimeError(f"rollout chunk {c} failed {tries[c]} times (rl.ray.max_chunk_retries="
                                       f"{self.max_chunk_retries}): its actor keeps dying: {e}") from e
                print(f"[rl] rollout actor {w} died ({type(e).__name__}); restarting it and retrying chunk {c}",
                      file=sys.stderr)
                self._restart(w)
                pending.appendleft(c)
            idle.append(w)
            if c in results and on_result is not None:
                on_result(c, w)
        return [results[i] for i in range(len(chunks))]

    def close(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []
        if self.owns_ray:
            ray.shutdown()


def build_rollouts(rcfg, model, decode: dict):
    """`rl.ray.enabled`: RayRollouts with copies of `model`'s architecture; else LocalRollouts on it."""
    if not rcfg.enabled:
        return LocalRollouts(model, decode)
    return RayRollouts(rcfg, model.config, decode)


# ----------------------------------------------------------------------------- one step's rollouts


def make_chunks(input_ids: torch.Tensor, prompt_lengths: torch.Tensor, group_size: int, prompts_per_chunk: int,
                seed: int, step: int) -> list[RolloutChunk]:
    """Cut (P, W) prompts into chunks of `prompts_per_chunk` prompts, each repeated `group_size` times."""
    chunks = []
    for i, start in enumerate(range(0, input_ids.shape[0], prompts_per_chunk)):
        rows = slice(start, start + prompts_per_chunk)
        chunks.append(RolloutChunk(i, input_ids[rows].repeat_interleave(group_size, 0),
                                   prompt_lengths[rows].repeat_interleave(group_size, 0), chunk_seed(seed, step, i)))
    return chunks


def rollout_step(executor, tokenizer, prompts: list, *, group_size: int, prompts_per_chunk: int, seed: int,
                 step: int, eos_token_id: int, block_length: int,
                 on_result: Callable | None = None) -> RolloutBatch:
    """G completions for every prompt (a string or chat messages), assembled into the SFT layout.

    The ELBO then scores exactly the blocks the decoder filled: an SFT example likewise ends with EOS
    up to its block boundary, and those EOS are part of what the model learned to produce."""
    input_ids, plen = encode_prompts(tokenizer, prompts)  # (P, W), (P,)
    chunks = make_chunks(input_ids, plen, group_size, prompts_per_chunk, seed, step)
    start = time.perf_counter()
    results = executor.run(chunks, on_result)
    seconds = time.perf_counter() - start
    responses = torch.cat([r["responses"] for r in results])  # (B, gen_length)
    lengths = torch.cat([r["lengths"] for r in results])  # (B,)
    nfe = torch.cat([r["nfe"] for r in results])
    prompt_rows = input_ids.repeat_interleave(group_size, 0)  # (B, W)
    ids, response_mask, pad_mask = training_rows(prompt_rows, plen.repeat_interleave(group_size, 0), responses,
                                                 lengths, block_length, eos_token_id)
    return RolloutBatch(ids, response_mask, pad_mask, decode_responses(tokenizer, responses, lengths, eos_token_id),
                        response_ids(responses, lengths, eos_token_id), lengths, nfe, seconds)


def training_rows(prompt_rows: torch.Tensor, prompt_lens: torch.Tensor, responses: torch.Tensor,
                  lengths: torch.Tensor, block_length: int, eos_token_id: int):
    """Decoded rows in the SFT layout: prompt at position 0, the response, EOS to the end of the
    block holding the first EOS. Returns (B, L) ids, response mask and padding mask.

    The decoder stops a row at the block holding its first EOS; later blocks are never decoded,
    and in SFT they are padding (never attended, never trained): scoring them would train EOS
    predictions the model never needed, with huge losses that swamp the answer tokens."""
    gen_length = responses.shape[1]
    ends = row_blocks(prompt_lens, lengths, block_length) * block_length  # (B,) scored up to here
    bsz, width = len(lengths), int((row_blocks(prompt_lens, gen_length, block_length) * block_length).max())
    ids = torch.full((bsz, width), eos_token_id, dtype=torch.long)
    response_mask = torch.zeros(bsz, width, dtype=torch.bool)
    pad_mask = torch.zeros(bsz, width, dtype=torch.bool)
    for r in range(bsz):
        p, n, end = int(prompt_lens[r]), int(lengths[r]), int(ends[r])
        ids[r, :p] = prompt_rows[r, prompt_rows.shape[1] - p:]
        ids[r, p:p + n] = responses[r, :n]
        response_mask[r, p:end] = True
        pad_mask[r, :end] = True
    return ids, response_mask, pad_mask


# ----------------------------------------------------------------------------- rewards as Ray tasks


def _call_reward_with_path(fn: str, prompts: list, completions: list, kwargs: dict, path: list) -> Scores:
    """Ray task body: the driver's sys.path first (module specs resolve as on the driver), then the call."""
    sys.path[:0] = [p for p in path if p not in sys.path]
    return call_reward(fn, prompts, completions, kwargs)


_REMOTE_REWARD = None


def ray_reward_executor(spec: RewardSpec, prompts: list, completions: list, kwargs: dict) -> Scores:
    """RewardExecutor running the call as a Ray task; an overrun task is force-cancelled (its worker
    process killed) and reported as TimeoutError."""
    import ray
    from ray.exceptions import GetTimeoutError, RayTaskError, WorkerCrashedError

    global _REMOTE_REWARD
    if _REMOTE_REWARD is None:
        _REMOTE_REWARD = ray.remote(num_cpus=0, max_retries=0)(_call_reward_with_path)
    ref = _REMOTE_REWARD.remote(spec.fn, prompts, completions, kwargs, list(sys.path))
    try:
        return ray.get(ref, timeout=spec.timeout_s)
    except GetTimeoutError:
        ray.cancel(ref, force=True)
        raise TimeoutError(f"reward {spec.name!r} exceeded its timeout of {spec.timeout_s}s") from None
    except RayTaskError as e:
        cause = e.cause if e.cause is not None else e
        raise RewardError(f"reward {spec.name!r} raised {type(cause).__name__}: {cause}") from None
    except WorkerCrashedError as e:
        raise RewardError(f"reward {spec.name!r}: its Ray worker died ({e})") from None
