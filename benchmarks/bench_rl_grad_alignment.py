"""Does an RL step push where an SFT step on the same answers does? Gradient cosines from ONE SFT export.

The export's own RL rollouts (the RL config's decoder, `--prompts` train prompts x rl.group_size) are
scored by the task checker. Three gradients of the export's weights, each on `--draws` independent
noise draws: EBPO with `rl.advantage=none` (0/1 rewards: only the correct completions pushed up,
groups without variance dropped, as in the RL stage), and the SFT objective of the export's run
(its `diffusion` section, MTF included) on those same correct completions as assistant answers. Reported: mean
cosine RL-RL and SFT-SFT (the noise floor of each estimate) and RL-SFT. If RL-SFT is near the floors,
the RL step is an SFT step on the model's own correct answers, and what separates RL from SFT in
training is the data and its weight, not the direction of the update.

Families and options come from the SFT run's config.yaml (the directory above --sft), as in
bench_rl_estimators.py.
Run: OMP_NUM_THREADS=2 python benchmarks/bench_rl_grad_alignment.py --sft runs/rg_arith_sft_longer/hf
Writes benchmarks/results/<--name, default bench_rl_grad_alignment>.{json,md}.
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_rl_estimators import arm_config, read_sft_run
from benchmarks.common import write_results
from llada_train.data.chat import tokenize_chat
from llada_train.data.prompts import load_rl_rows
from llada_train.data.tasks import row_correct
from llada_train.data.tokenizer import load_tokenizer, special_token_ids
from llada_train.diffusion import ordinary_token_ids, training_loss
from llada_train.model import LLaDA2MoeModelLM
from llada_train.rl import ebpo
from llada_train.rl.policy import zero_variance_groups
from llada_train.rl.rollout import LocalRollouts, rollout_step
from llada_train.stages.registry import load_stage_config
from llada_train.stages.rl import rl_response_budget


def flat_grad(model, loss: torch.Tensor) -> torch.Tensor:
    """The loss's gradient over every trainable parameter, flattened; grads reset afterwards."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return grad


def mean_cosine(a: list[torch.Tensor], b: list[torch.Tensor] | None = None) -> float:
    """Mean cosine over pairs: distinct pairs within `a`, or all pairs of a x b."""
    pairs = itertools.combinations(a, 2) if b is None else itertools.product(a, b)
    values = [torch.nn.functional.cosine_similarity(x, y, dim=0).item() for x, y in pairs]
    return sum(values) / len(values)


def rl_gradients(model, cfg, roll, rewards, draws: int) -> list[torch.Tensor]:
    """EBPO gradients of the rollout batch, one per noise draw (the RL stage's batch and loss)."""
    grads = []
    for seed in range(draws):
        batch, _ = ebpo.build_batch(model, roll.input_ids, roll.response_mask, rewards, cfg.rl, cfg.rl.ebpo,
                                    block_size=cfg.diffusion.block_size, pad_mask=roll.pad_mask,
                                    generator=torch.Generator().manual_seed(seed))
        loss, _ = ebpo.ebpo_minibatch_loss(model, batch, cfg.rl, cfg.rl.ebpo)
        grads.append(flat_grad(model, loss))
    return grads


def sft_gradients(model, tokenizer, sft_cfg, chats: list[dict], draws: int) -> list[torch.Tensor]:
    """Gradients of the export run's SFT objective on the given chats, one per noise draw."""
    data = tokenize_chat(chats, tokenizer, block_size=sft_cfg.diffusion.block_size, max_len=None)
    batch = data.collate(data.examples)
    vocab = ordinary_token_ids(len(tokenizer), special_token_ids(tokenizer))  # as the SFT stage draws T2T tokens
    grads = []
    for seed in range(draws):
        loss, _ = training_loss(model, batch["input_ids"], batch["response_mask"], batch["doc_ids"],
                                batch["doc_ids"] >= 0, sft_cfg.diffusion, step=10**9,
                                mask_id=model.config.mask_token_id, vocab_ids=vocab,
                                generator=torch.Generator().manual_seed(seed))
        grads.append(flat_grad(model, loss))
    return grads


def rollouts_and_pushed(model, cfg, tokenizer, rows: list[dict], gen_length: int, seed: int):
    """G rollouts per prompt with the RL stage's decoder, their 0/1 rewards (B,), and the completions
    EBPO's update pushes up (correct, in a group with variance) as SFT chats."""
    group, block = cfg.rl.group_size, cfg.diffusion.block_size
    prompts = [r[cfg.data.prompt_field] for r in rows]
    decoder = LocalRollouts(model.eval(), cfg.rl.rollout_decoding(gen_length, block))
    roll = rollout_step(decoder, tokenizer, prompts, group_size=group, prompts_per_chunk=cfg.rl.prompts_per_chunk,
                        seed=seed, step=0, eos_token_id=model.config.eos_token_id, block_length=block)
    rewards = torch.tensor([float(row_correct(rows[i // group], c)) for i, c in enumerate(roll.completions)])
    pushed = (rewards > 0) & ~zero_variance_groups(rewards, group)
    chats = [{"messages": [{"role": "user", "content": prompts[i // group]},
                           {"role": "assistant", "content": roll.completions[i]}]}
             for i in pushed.nonzero().squeeze(1).tolist()]
    if not chats:
        raise SystemExit("no group has both right and wrong completions: nothing for RL to push; raise --prompts")
    return roll, rewards, chats


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", default="runs/rg_arith_sft_longer/hf", help="SFT export (hf/ inside its run dir)")
    p.add_argument("--rl-config", default="rl_reasoning", help="RL YAML or preset: decoder, group size, noise")
    p.add_argument("--prompts", type=int, default=48, help="train prompts to roll out")
    p.add_argument("--draws", type=int, default=3, help="noise draws per gradient estimate")
    p.add_argument("--seed", type=int, default=1, help="rollout seed")
    p.add_argument("--name", default="bench_rl_grad_alignment")
    return p.parse_args()


def main():
    args = parse_args()
    sft_raw = read_sft_run(args.sft)
    cfg = arm_config(argparse.Namespace(rl_config=args.rl_config), [f"model.init_from={args.sft}", "rl.advantage=none",
                     f"diffusion.block_size={sft_raw['diffusion']['block_size']}", "data.train=tasks"], sft_raw)
    sft_cfg = load_stage_config("sft", str(Path(args.sft).parent / "config.yaml"), [])
    tokenizer = load_tokenizer(args.sft)
    model = LLaDA2MoeModelLM.from_pretrained(args.sft)
    train_rows, _ = load_rl_rows(cfg.data, cfg.run.seed)
    rows, gen_length = train_rows[:args.prompts], rl_response_budget(cfg, tokenizer, train_rows)
    roll, rewards, chats = rollouts_and_pushed(model, cfg, tokenizer, rows, gen_length, args.seed)
    model.train()
    rl = rl_gradients(model, cfg, roll, rewards, args.draws)
    sft = sft_gradients(model, tokenizer, sft_cfg, chats, args.draws)
    row = {"prompts": len(rows), "rollouts": len(rewards), "reward_mean": round(rewards.mean().item(), 4),
           "pushed_completions": len(chats), "draws": args.draws,
           "cos_rl_rl": round(mean_cosine(rl), 3), "cos_sft_sft": round(mean_cosine(sft), 3),
           "cos_rl_sft": round(mean_cosine(rl, sft), 3)}
    print(row)
    write_results(args.name, [row], notes=f"SFT export {args.sft}; RL config {args.rl_config} with rl.advantage=none "
                  f"and the export's families; SFT objective = the export run's diffusion section; "
                  f"mean cosines over pairs of {args.draws} noise draws (RL-RL, SFT-SFT) and all RL x SFT pairs.")


if __name__ == "__main__":
    main()
