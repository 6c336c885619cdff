"""CPT step at real vocabulary sizes: tokens/s, peak step memory, executed and useful FLOPs / MFU.

One step = the objective (M2T + T2T, block 32, sdpa, fp32) forward + backward + AdamW, in up to
three arms on the same weights, noise and mask, timed interleaved (median of `--repeats`; each repeat
starts with the next arm, so no arm always runs first; speed-ups are medians of the per-repeat ratios,
with their range):
  chunked      this project's `diffusion.training_loss`: only the supervised positions (masked +
               replaced) go through the lm_head, via the chunked linear cross-entropy;
  full_logits  the step as it was before: the lm_head over all 2L positions, the noisy half sliced
               off, float32 cross-entropy over every position (kept here as the "before" arm);
  upstream     the upstream LLaDA2.1 modeling code (`--upstream DIR`, DIR = dllm/pipelines/llada21/
               models/ of lingjiechen2/dllm, loaded from there, never vendored) with the full-logit loss.
Peak memory: peak RSS above the RSS before a step (VmHWM reset through /proc/self/clear_refs), over
forward + backward (activations, logits, their gradients: what the chunked head changes; the
reduction columns use it) and over the whole step (+ AdamW's temporaries), each arm in a fresh
spawned process with glibc's mmap threshold at 64 KiB, so freed tensors go back to the OS and RSS
follows live memory; weights, gradient buffers and AdamW state exist before the measured step.
FLOPs: executed = matmuls counted by `torch.utils.flop_counter` on a real step (it does not see CPU
sdpa) + the dense attention sdpa runs (every (q, k) pair, 12·head_dim FLOPs per pair and head,
forward + backward); useful = the same with the lm_head at the supervised positions only
(6·N·H·V) and attention over the pairs the §3 mask keeps. MFU = FLOPs / step time / the measured
fp32 matmul peak at the same thread count.

`--models smollm2` (after `make smollm2`): the real model, SmolLM2-135M converted, in the `chunked` arm
against its AR source's own training step in transformers (`ar`: next-token CE over every position), same
rows (4 x 256), fp32: the objective's `[x_t ; x_0]` layout doubles the tokens the body sees, so about 2x
is its price; GFLOP_matmul shows how much of the ratio is matmuls (CPU sdpa is not counted).

Run: python benchmarks/bench_train.py --threads 1 [--upstream DIR] [--quick] [--models smollm2 --name NAME]
"""

import argparse
import functools
import importlib.util
import math
import multiprocessing
import os
import statistics
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import time_call, write_results
from llada_train.config import DiffusionConfig
from llada_train.diffusion import (
    corrupt_t2t,
    model_inputs,
    noise_batch,
    ordinary_token_ids,
    supervised_positions,
    training_loss,
)
from llada_train.model import LLaDA2MoeConfig, LLaDA2MoeModelLM
from llada_train.model.modeling_llada2_moe import to_released_layout
from llada_train.presets import MODEL_PRESET_DIR

ARMS = ("chunked", "full_logits", "upstream")
REFERENCE_ARMS = ("full_logits", "upstream", "ar")
SMOLLM2 = Path(__file__).resolve().parents[1] / ".cache" / "smollm2"  # `make smollm2`
MID = {
    "vocab_size": 4096,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "num_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 4,
    "topk_group": 2,
    "pad_token_id": 0,
    "eos_token_id": 0,
    "mask_token_id": 1,
}
RELEASED_VOCAB = {**MID, "vocab_size": 157184, "num_hidden_layers": 2}
NOT_UPSTREAM_KEYS = ("model_type", "transformers_version", "architectures", "attn_backend", "auto_map")


def presets(quick: bool) -> dict:
    """name -> (model values, batch, seq_len)."""
    import yaml

    tiny = yaml.safe_load((MODEL_PRESET_DIR / "tiny.yaml").read_text())
    return {"tiny": (tiny, 16, 128), "mid": (MID, 4, 256),
            "vocab157k": (RELEASED_VOCAB, 2, 256 if quick else 512)}


@functools.cache
def load_upstream(path: str):
    """The upstream modeling package (its __init__ imports the config and model modules)."""
    init = Path(path) / "__init__.py"
    if not (init.is_file() and (Path(path) / "modeling_llada21_moe.py").is_file()):
        raise ValueError(f"--upstream {path}: expected dllm/pipelines/llada21/models/ of lingjiechen2/dllm "
                         "(with __init__.py and modeling_llada21_moe.py)")
    _shim_transformers_5()
    spec = importlib.util.spec_from_file_location("upstream_llada21", init, submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _shim_transformers_5() -> None:
    """Two things upstream imports that transformers 5 removed: `modeling_attn_mask_utils` (its helper
    is only reached with non-boolean masks; this benchmark passes boolean 4D masks) and the "default"
    RoPE initialiser (plain theta^(-2i/d) over head_dim * partial_rotary_factor dims)."""
    from transformers import modeling_rope_utils

    name = "transformers.modeling_attn_mask_utils"
    if importlib.util.find_spec(name) is None:
        def not_for_boolean_masks(*_args, **_kwargs):
            raise NotImplementedError("bench_train passes the upstream model boolean 4D masks only")

        shim = types.ModuleType(name)
        shim._prepare_4d_causal_attention_mask_for_sdpa = not_for_boolean_masks
        sys.modules[name] = shim

    def default_rope(config, device=None):
        dim = int(config.head_dim * config.partial_rotary_factor)
        exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
        return 1.0 / config.rope_theta**exponents, 1.0

    modeling_rope_utils.ROPE_INIT_FUNCTIONS.setdefault("default", default_rope)


def upstream_model(package, ours: LLaDA2MoeModelLM):
    """The upstream model with our weights (same released state-dict names), sdpa attention."""
    values = {k: v for k, v in ours.config.to_dict().items() if k not in NOT_UPSTREAM_KEYS}
    config = package.LLaDA2MoeConfig(**values)
    config._attn_implementation = "sdpa"
    model = package.LLaDA2MoeModelLM(config)
    missing, unexpected = model.load_state_dict(to_released_layout(ours.state_dict()), strict=False)
    if missing or unexpected:
        raise ValueError(f"upstream model does not take our weights: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    return model.train()


def full_logit_loss(logits, batch, cfg):
    """The objective as it was computed before the chunked head: float32 CE over every position."""
    logits = logits.float()
    ce = F.cross_entropy(logits.flatten(0, 1), batch.x0.flatten(), reduction="none").view_as(batch.x0)
    kept = batch.maskable & ~batch.masked & ~batch.replaced
    total = (ce * batch.weight * batch.masked).sum() + cfg.t2t.weight * (ce * batch.replaced).sum()
    return (total + cfg.t2t.keep_weight * (ce * kept).sum()) / batch.maskable.sum().clamp_min(1)


@dataclass
class Setup:
    """One preset's models, optimizers and inputs, with a step (forward + backward) per arm."""

    values: dict
    batch: int
    seq_len: int
    cfg: DiffusionConfig
    model: LLaDA2MoeModelLM
    upstream: object | None
    x0: torch.Tensor  # (B, L)
    vocab_ids: torch.Tensor
    ar: object | None = None  # the AR source (transformers), for the real-model preset
    mask_id: int = 1

    def arms(self) -> list[str]:
        if self.ar is not None:
            return ["chunked", "ar"]
        return [a for a in ARMS if a != "upstream" or self.upstream is not None]

    def noised(self, generator):
        """The arms' shared noising (the draws `training_loss` makes with the same generator)."""
        maskable, doc_ids = self.rows()
        batch = noise_batch(self.x0, maskable, doc_ids, doc_ids >= 0, self.cfg.block_size, self.cfg, self.mask_id,
                            generator)
        return corrupt_t2t(batch, self.cfg.t2t.max_ratio, self.vocab_ids, generator)

    def rows(self):
        """Every token maskable, one document per row: (B, L) bool, (B, L) ids."""
        return torch.ones_like(self.x0, dtype=torch.bool), torch.zeros_like(self.x0)

    def forward_backward(self, arm: str, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        if arm == "chunked":
            maskable, doc_ids = self.rows()
            loss, _ = training_loss(self.model, self.x0, maskable, doc_ids, doc_ids >= 0, self.cfg, step=0,
                                    mask_id=self.mask_id, vocab_ids=self.vocab_ids, generator=generator)
        elif arm == "ar":  # next-token CE over every position of x0, as the AR source trains
            loss = self.ar(input_ids=self.x0, labels=self.x0).loss
        else:
            batch = self.noised(generator)
            inputs = model_inputs(batch, self.cfg.block_size)
            model = self.model if arm == "full_logits" else self.upstream
            if arm == "upstream":
                inputs["attention_mask"] = inputs["attention_mask"].dense()  # (B, 1, 2L, 2L) bool
            logits = model(**inputs).logits[:, : self.seq_len]  # (B, L, V)
            loss = full_logit_loss(logits, batch, self.cfg)
        loss.backward()

    def step(self, arm: str, optimizers: dict):
        self.forward_backward(arm)
        optimizers[arm].step()
        optimizers[arm].zero_grad(set_to_none=False)  # gradient buffers persist, as DeepSpeed's do


def build(name: str, args) -> Setup:
    if name == "smollm2":
        return build_smollm2(args)
    values, batch, seq_len = presets(args.quick)[name]
    torch.manual_seed(0)
    model = LLaDA2MoeModelLM(LLaDA2MoeConfig(**{**values, "attn_backend": "sdpa"})).train()
    upstream = upstream_model(load_upstream(args.upstream), model) if args.upstream else None
    cfg = DiffusionConfig(block_size=32)
    cfg.t2t.max_ratio, cfg.t2t.keep_weight = 0.1, args.keep_weight
    x0 = torch.randint(5, values["vocab_size"], (batch, seq_len), generator=torch.Generator().manual_seed(0))
    vocab_ids = ordinary_token_ids(values["vocab_size"], range(5))
    return Setup(values, batch, seq_len, cfg, model, upstream, x0, vocab_ids)


def build_smollm2(args, batch: int = 4, seq_len: int = 256) -> Setup:
    """The real model: SmolLM2-135M converted (`make smollm2`: .cache/smollm2/converted) against its AR
    source (.cache/smollm2/source) with transformers' own training step, same rows, fp32, sdpa."""
    from transformers import AutoModelForCausalLM

    converted, source = args.smollm2 / "converted", args.smollm2 / "source"
    if not (converted / "config.json").is_file() or not (source / "config.json").is_file():
        raise SystemExit(f"--models smollm2: no {converted} / {source}; run `make smollm2` first")
    model = LLaDA2MoeModelLM.from_pretrained(converted, dtype=torch.float32).train()
    ar = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="sdpa").train()
    cfg = DiffusionConfig(block_size=32)
    cfg.t2t.max_ratio, cfg.t2t.keep_weight = 0.1, args.keep_weight
    vocab = ar.config.vocab_size
    x0 = torch.randint(5, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    return Setup(model.config.to_dict(), batch, seq_len, cfg, model, None, x0,
                 ordinary_token_ids(model.config.vocab_size, range(5)), ar=ar, mask_id=model.config.mask_token_id)


def optimizers_for(setup: Setup, arms) -> dict:
    opt = torch.optim.AdamW(setup.model.parameters(), lr=1e-4)
    own = {"upstream": setup.upstream, "ar": setup.ar}  # arms that train another copy of the weights
    return {arm: torch.optim.AdamW(own[arm].parameters(), lr=1e-4) if arm in own else opt for arm in arms}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_step_mib(name: str, arm: str, args, result) -> None:
    """Child process: one warm-up step (weights, gradient buffers and AdamW state then exist), then
    the peak RSS above the RSS before the next step, over forward + backward and over the whole step."""
    torch.set_num_threads(args.threads)
    setup = build(name, args)
    optimizers = optimizers_for(setup, [arm])
    setup.step(arm, optimizers)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _rss_kib("VmRSS")
    setup.forward_backward(arm)
    forward_backward = _rss_kib("VmHWM") - before
    optimizers[arm].step()
    result.put((forward_backward / 1024, (_rss_kib("VmHWM") - before) / 1024))


def peak_step_mib(name: str, arm: str, args) -> tuple[float, float]:
    """(forward + backward, whole step with AdamW) peak MiB above the memory held between steps."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the spawned child's glibc at start-up
    ctx = multiprocessing.get_context("spawn")
    result = ctx.Queue()
    child = ctx.Process(target=_peak_step_mib, args=(name, arm, args, result))
    child.start()
    value = result.get()
    child.join()
    return value


def grouped_mm_flops(a_shape, b_shape, *_args, out_shape=None, **_kwargs) -> int:
    """`torch._grouped_mm` (which `flop_counter` does not count): 2·|out|·contraction; when both inputs
    are 2D the groups split the contraction, one (N, K) output per group."""
    flops = 2 * math.prod(out_shape) * a_shape[-1]
    return flops // out_shape[0] if len(a_shape) == len(b_shape) == 2 else flops


def counted_flops(setup: Setup, arm: str) -> float:
    """Matmul FLOPs (mm, bmm, grouped expert GEMMs) of one forward + backward, counted on a real step."""
    grouped = {torch.ops.aten._grouped_mm: grouped_mm_flops}
    with FlopCounterMode(display=False, custom_mapping=grouped) as counter:
        setup.forward_backward(arm)
    for model in (setup.model, setup.upstream, setup.ar):
        if model is not None:
            model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def flop_terms(setup: Setup) -> dict:
    """Attention FLOPs (dense as sdpa runs them, and over the kept pairs) and lm_head FLOPs per row."""
    v, batch_rows = setup.values, setup.batch
    batch = setup.noised(torch.Generator().manual_seed(0))
    mask = model_inputs(batch, setup.cfg.block_size)["attention_mask"].dense()  # (B|1, 1, 2L, 2L)
    kept = mask.sum().item() * (batch_rows if mask.shape[0] == 1 else 1)
    per_pair = 12 * v["head_dim"] * v["num_attention_heads"] * v["num_hidden_layers"]  # fwd 4d + bwd 8d
    return {"attn_dense": per_pair * batch_rows * mask.shape[-1] ** 2, "attn_kept": per_pair * kept,
            "head_row": 2 * v["hidden_size"] * v["vocab_size"],
            "supervised": int(supervised_positions(batch, setup.cfg).sum()),
            "all_rows": batch_rows * mask.shape[-1]}


def useful_flops(counted_chunked: float, terms: dict) -> float:
    """What the step needs: the chunked arm's matmuls without its lm_head recompute (3 GEMMs at the
    N supervised rows instead of 4), plus attention over the kept pairs only."""
    return counted_chunked - terms["head_row"] * terms["supervised"] + terms["attn_kept"]


def bench(name: str, args, peak: float) -> list[dict]:
    setup = build(name, args)
    arms = setup.arms()
    optimizers = optimizers_for(setup, arms)
    times = {arm: [] for arm in arms}
    for arm in arms:
        setup.step(arm, optimizers)  # warm-up
    for r in range(args.repeats):
        for arm in arms[r % len(arms):] + arms[:r % len(arms)]:  # each arm first in turn: no fixed-order bias
            start = time.perf_counter()
            setup.step(arm, optimizers)
            times[arm].append(time.perf_counter() - start)
        print(f"{name}: repeat {r + 1}/{args.repeats}", flush=True)
    terms = flop_terms(setup) if setup.ar is None else None
    executed = {arm: counted_flops(setup, arm) for arm in arms}
    rows = []
    for arm in arms:
        step_s = statistics.median(times[arm])
        peak_fwd_bwd, peak_step = peak_step_mib(name, arm, args)
        row = {"model": name, "arm": arm, "batch x seq": f"{setup.batch}x{setup.seq_len}",
               "step_s": step_s, "tokens_per_s": setup.batch * setup.seq_len / step_s,
               "peak_fwd_bwd_MiB": peak_fwd_bwd, "peak_step_MiB": peak_step, "times": times[arm]}
        if terms is None:  # the real model against its AR source: matmuls only (CPU sdpa is not counted)
            row["GFLOP_matmul"] = executed[arm] / 1e9
        else:
            useful = useful_flops(executed["chunked"], terms)
            row |= {"lm_head_rows": terms["supervised"] if arm == "chunked" else terms["all_rows"],
                    "GFLOP_executed": (executed[arm] + terms["attn_dense"]) / 1e9, "GFLOP_useful": useful / 1e9,
                    "MFU_executed": (executed[arm] + terms["attn_dense"]) / step_s / peak,
                    "MFU_useful": useful / step_s / peak}
        rows.append(row)
        print(f"{name}/{arm}: {rows[-1]}", flush=True)
    return with_ratios(rows)


def with_ratios(rows: list[dict]) -> list[dict]:
    """Speed-up (median of the per-repeat ratios, and their range) and memory reduction of every arm
    relative to each reference arm present (full_logits, upstream, ar)."""
    by_arm = {r["arm"]: r for r in rows}
    for row in rows:
        for ref in REFERENCE_ARMS:
            base = by_arm.get(ref)
            if base is None:
                continue
            ratios = [b / t for t, b in zip(row["times"], base["times"], strict=True)]  # same repeat, same order slot
            row[f"speedup_vs_{ref}"] = statistics.median(ratios)
            row[f"speedup_vs_{ref}_range"] = f"{min(ratios):.2f}-{max(ratios):.2f}"
            row[f"mem_reduction_vs_{ref}"] = base["peak_fwd_bwd_MiB"] / row["peak_fwd_bwd_MiB"]
    for row in rows:
        row.pop("times")
    return rows


def matmul_peak_flops(n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / time_call(lambda: a @ b, warmup=3, repeats=10)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="L 256 at the released vocabulary, 3 repeats")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per arm, interleaved (5)")
    parser.add_argument("--upstream", default=None,
                        help="the dllm/pipelines/llada21/models/ directory of lingjiechen2/dllm")
    parser.add_argument("--keep-weight", type=float, default=0.0,
                        help="t2t.keep_weight (> 0 supervises every token)")
    parser.add_argument("--models", default="tiny,mid,vocab157k",
                        help="comma-separated: tiny, mid, vocab157k, smollm2 (the real model against its AR "
                             "source; `make smollm2` first)")
    parser.add_argument("--smollm2", type=Path, default=SMOLLM2, help="the `make smollm2` cache")
    parser.add_argument("--name", default="bench_train", help="results name (benchmarks/results/<name>.md/.json)")
    args = parser.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 5)
    torch.set_num_threads(args.threads)
    peak = matmul_peak_flops()
    rows = [row for name in args.models.split(",") for row in bench(name, args, peak)]
    command = " ".join(["python benchmarks/bench_train.py", *sys.argv[1:]])
    notes = (
        f"`{command}`. Measured fp32 matmul peak (1024^3, {args.threads} threads, before the run): "
        f"{peak / 1e9:.1f} GFLOP/s. tokens/s counts input tokens (L per row; the model runs over 2L). "
        f"Median of {args.repeats} interleaved steps per arm (forward + backward + AdamW). Peak memory: RSS "
        "above what is held between steps (weights, gradient buffers, AdamW state), over forward + backward "
        "(peak_fwd_bwd_MiB; the mem_reduction columns) and over the whole step (peak_step_MiB), in a fresh "
        "process per arm. GFLOP_useful counts the "
        "lm_head at the supervised positions and attention over the pairs the mask keeps (the same for "
        "every arm); see the module docstring."
    )
    write_results(args.name, rows, notes)


if __name__ == "__main__":
    main()
