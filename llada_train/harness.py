"""lm-evaluation-harness adapter: this project's models as a harness `LM`.

`generate_until` runs the threshold decoder with the export's saved decoding settings (or a
mode's); `loglikelihood` is the diffusion ELBO of the continuation given the context, a
Monte-Carlo estimate over mask levels with the one-pass block estimator RL uses
(`rl.ebpo.block_elbo_terms`), whose standard error is kept per request. A masked-diffusion model
has no exact log-likelihood: the ELBO is a lower bound, so compare choices with it, not
perplexities across model families.

Use it from your own harness script:

    from llada_train.harness import DiffusionLM
    lm = DiffusionLM.from_dir("runs/demo/rl/hf", mode="Q")
    lm_eval.simple_evaluate(model=lm, tasks=["gsm8k"], apply_chat_template=True)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .decoding import complete, generate, mode_params, response_ids, saved_decode_settings
from .errors import UserError
from .progress import progress
from .rl.ebpo import block_elbo_terms

T_MIN = 1e-3  # mask levels below this are clamped: the 1/t weight would blow the variance up


@dataclass
class EvalStats:
    """What the harness's results JSON lacks: decoding speed and the ELBO's Monte-Carlo error."""

    generated_tokens: int = 0
    forwards: int = 0
    decode_seconds: float = 0.0
    loglikelihood: list = field(default_factory=list)  # per request: {"logprob", "standard_error", "tokens"}

    def summary(self) -> dict:
        errors = [r["standard_error"] for r in self.loglikelihood]
        return {"generated_tokens": self.generated_tokens, "model_forwards": self.forwards,
                "tokens_per_forward": self.generated_tokens / max(self.forwards, 1),
                "decode_seconds": round(self.decode_seconds, 3),
                "loglikelihood_requests": len(errors),
                "loglikelihood_mean_standard_error": sum(errors) / len(errors) if errors else None,
                "loglikelihood_max_standard_error": max(errors, default=None)}


class DiffusionLM(LM):
    """A LLaDA2-MoE export behind lm-evaluation-harness's `LM` interface."""

    def __init__(self, model, tokenizer, *, decode: dict, block_size: int, batch_size: int = 8,
                 mc_samples: int = 32, seed: int = 0, max_length: int | None = None, name: str = "llada2"):
        super().__init__()
        if mc_samples < 2:
            raise UserError(f"--mc-samples must be >= 2 (the standard error needs two), got {mc_samples}")
        if batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.decode = model.eval(), tokenizer, decode
        self.block_size, self.batch_size, self.mc_samples = block_size, batch_size, mc_samples
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", 4096)
        self.generator = torch.Generator().manual_seed(seed)
        self.name = name
        self.stats = EvalStats()

    @classmethod
    def from_dir(cls, model_dir: str, *, mode: str | None = None, device: str = "cpu", tokenizer: str | None = None,
                 **kwargs) -> DiffusionLM:
        """Load an export; decoding settings: the saved generation_config.json, then `mode`'s thresholds."""
        from .data.tokenizer import load_tokenizer
        from .model import LLaDA2MoeModelLM

        decode = saved_decode_settings(model_dir, mode)
        model = LLaDA2MoeModelLM.from_pretrained(model_dir).to(device)
        name = tokenizer or (model_dir if (Path(model_dir) / "tokenizer.json").exists() else None)
        decode["mode"] = mode or decode.get("decode_mode", "Q")
        return cls(model, load_tokenizer(name), decode=decode, block_size=kwargs.pop("block_size", None)
                   or decode["block_length"], name=str(model_dir), **kwargs)

    # ---- chat template (the harness's --apply_chat_template) ----------------------------------

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The text `generate --prompts` decodes after: a single user turn renders exactly as there."""
        from .data.chat import render_prompt

        return render_prompt(chat_history, self.tokenizer, add_generation_prompt=add_generation_prompt)

    # ---- generate_until -----------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Threshold decoding of each context (already templated by the harness when asked), in
        request order and batches of `batch_size`; the text is cut at the first stop sequence."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        bar = progress(len(requests), desc="generate_until", unit="request", disable=disable_tqdm)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in chunk], kwargs)
                for i, text in zip(chunk, texts, strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out

    def _generate(self, contexts: list[str], kwargs: dict) -> list[str]:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        gen_length = int(kwargs.get("max_gen_toks") or self.decode["gen_length"])
        sampling = {"temperature": float(kwargs["temperature"])} if kwargs.get("do_sample") else {}
        settings = {k: v for k, v in self.decode.items()
                    if k in ("threshold", "editing_threshold", "max_post_steps", "mbe_window")}
        contexts = [self._fit_context(c, gen_length) for c in contexts]
        start = time.perf_counter()
        with torch.no_grad():
            done = complete(self.model, self.tokenizer, contexts, mode=self.decode["mode"], gen_length=gen_length,
                            block_length=self.decode["block_length"], chat=False, batch_size=len(contexts),
                            generator=self.generator, **settings, **sampling)
        self.stats.decode_seconds += time.perf_counter() - start
        self.stats.generated_tokens += sum(len(ids) for ids in done.token_ids)
        self.stats.forwards += sum(done.nfe)
        return [_cut_at_stops(text, until) for text in done.texts]

    def _fit_context(self, context: str, gen_length: int) -> str:
        """Keep the context's last tokens when context + answer would pass the model's length."""
        ids = self.tokenizer(context, add_special_tokens=False)["input_ids"]
        room = self.max_length - gen_length
        return context if len(ids) <= room else self.tokenizer.decode(ids[-room:])

    # ---- log-likelihood as the diffusion ELBO -------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(ELBO of the continuation, whether greedy decoding produces it) per (context, continuation)."""
        pairs = [self._encode_pair(*request.args) for request in requests]
        scores = self._elbo_pairs(pairs, disable_tqdm)
        greedy = self._greedy_matches(pairs)
        results = []
        for request, (value, error), pair, is_greedy in zip(requests, scores, pairs, greedy, strict=True):
            self.stats.loglikelihood.append({"logprob": value, "standard_error": error, "tokens": len(pair[1])})
            self.cache_hook.add_partial("loglikelihood", request.args, (value, is_greedy))
            results.append((value, is_greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The ELBO of a whole text, in disjoint windows of the model's length, each conditioned on
        the tokens before it (the harness's own windowing); the windows' errors add in quadrature."""
        results = []
        for request in requests:
            ids = self.tokenizer(request.args[0], add_special_tokens=False)["input_ids"]
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(  # context + window <= max_length
                ids, prefix_token=self.tokenizer.eos_token_id, max_seq_len=self.max_length - 1, context_len=1)]
            scores = self._elbo_pairs(windows, disable_tqdm=True)
            value = sum(v for v, _ in scores)
            error = math.sqrt(sum(e * e for _, e in scores))
            self.stats.loglikelihood.append({"logprob": value, "standard_error": error, "tokens": len(ids)})
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, value)
            results.append(value)
        return results

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation), split as the harness does: spaces at the end of the
        context move to the continuation, the whole is encoded once and cut at the context's length."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        cut = len(self.tokenizer(context, add_special_tokens=False)["input_ids"])
        if not context:
            return [self.tokenizer.eos_token_id], whole  # an empty context: condition on the document separator
        return whole[:cut], whole[cut:]

    def _elbo_pairs(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool) -> list[tuple[float, float]]:
        """(mean, standard error) of `mc_samples` ELBO draws per pair; rows of (pair, draw) go
        through the model `batch_size` pairs at a time."""
        out = []
        bar = progress(len(pairs), desc="loglikelihood", unit="request", disable=disable_tqdm)
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            draws = self._elbo_draws(chunk)  # (b, N)
            mean = draws.mean(1)
            error = draws.std(1, correction=1) / math.sqrt(self.mc_samples)
            out += list(zip(mean.tolist(), error.tolist(), strict=True))
            bar.update(len(chunk))
        bar.close()
        return out

    def _elbo_draws(self, pairs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        """N draws of Σ_blocks (1/t) Σ_{masked i} log p(y_i | z_t) per pair: (b, N), float64.

        t_n = (n + u_n) / N, one independent u per stratum, so each draw is unbiased for its
        stratum and the sample standard deviation over-, never under-, states the error."""
        device = next(self.model.parameters()).device
        width = max(len(c) + len(y) for c, y in pairs)
        ids = torch.full((len(pairs), width), self.tokenizer.eos_token_id, dtype=torch.long)
        response = torch.zeros_like(ids, dtype=torch.bool)
        real = torch.zeros_like(response)
        for r, (context, continuation) in enumerate(pairs):  # right-padded: positions start at 0 per row
            ids[r, :len(context) + len(continuation)] = torch.tensor(context + continuation)
            response[r, len(context):len(context) + len(continuation)] = True
            real[r, :len(context) + len(continuation)] = True
        n = self.mc_samples
        u = torch.rand(len(pairs), n, generator=self.generator, dtype=torch.float64)
        t = ((torch.arange(n, dtype=torch.float64) + u) / n).clamp_min(T_MIN)  # (b, N)
        noise = torch.rand(len(pairs), n, width, generator=self.generator, dtype=torch.float64) < t[..., None]
        with torch.no_grad():
            terms = block_elbo_terms(self.model, ids.to(device), response.to(device), self.block_size,
                                     t.to(device), (noise & response[:, None]).to(device), pad_mask=real.to(device),
                                     mask_token_id=self.model.config.mask_token_id)  # (b, N, nb)
        return terms.double().sum(-1).cpu()

    def _greedy_matches(self, pairs: list[tuple[list[int], list[int]]]) -> list[bool]:
        """Whether the decoder, run on each context, starts its answer with the continuation's
        tokens (one decode per distinct context, as long as its longest continuation)."""
        wanted: dict[tuple, int] = {}
        for context, continuation in pairs:
            wanted[tuple(context)] = max(wanted.get(tuple(context), 1), len(continuation))
        contexts, answers = list(wanted), {}
        for start in range(0, len(contexts), self.batch_size):
            chunk = contexts[start:start + self.batch_size]
            answers.update(zip(chunk, self._decode_ids(chunk, max(wanted[c] for c in chunk)), strict=True))
        return [answers[tuple(c)][:len(y)] == y for c, y in pairs]

    def _decode_ids(self, contexts: list[tuple], length: int) -> list[list[int]]:
        """Greedy answers (tokens before EOS) after left-padded context ids, in the eval's mode."""
        block = self.decode["block_length"]
        width = max(len(c) for c in contexts)
        ids = torch.full((len(contexts), width), self.tokenizer.eos_token_id, dtype=torch.long)
        for r, context in enumerate(contexts):
            ids[r, width - len(context):] = torch.tensor(context)
        settings = {k: v for k, v in self.decode.items() if k in ("threshold", "editing_threshold")}
        params = mode_params(self.decode["mode"], self.model.config, gen_length=-(-length // block) * block,
                             block_length=block, **settings)
        device = next(self.model.parameters()).device
        with torch.no_grad():
            out = generate(self.model, ids.to(device), prompt_lengths=torch.tensor([len(c) for c in contexts],
                                                                                    device=device), **params)
        return response_ids(out.sequences[:, width:], out.lengths, params["eos_token_id"])


def _cut_at_stops(text: str, until: list[str]) -> str:
    """The text before the earliest stop sequence (the harness's `until`)."""
    cut = min((text.find(s) for s in until if s and s in text), default=len(text))
    return text[:cut]
