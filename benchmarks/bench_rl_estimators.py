"""RL likelihood estimators side by side from ONE SFT export (docs/design.md §14): EBPO vs d1's diffu-GRPO.

Arms: no RL (the SFT start), `rl.estimator=diffu_grpo`, EBPO with the sequence ratio and N = 1, 2, 4
noise levels (and N = 2 as one complementary pair, `rl.ebpo.complementary`), EBPO with the block ratio
(N = 2). Every arm starts from the same export with the same
RL config and `run.seed`, so it sees the same prompts in the same order with the same rollout and
mask seeds, and gets the same rollout budget (train.steps x train.batch_size x rl.group_size
completions); only the likelihood estimate in the clipped ratio differs. Arms run one after the other
in this process (interleaving would not change what an arm computes, only make the wall-clock
columns share the load differently; the load average is recorded).

Measured per arm, every --eval-every RL steps: greedy held-out accuracy per family (rl.eval_mode, the
RL stage's own held-out rows, decoded as its evaluation does), against RL step and against training
wall-clock (evaluation time excluded), with 95% Wilson intervals, and the final gain over the start
with a paired 95% interval (same prompts). For the start: pass@1 and pass@8 from 8 completions per
held-out prompt sampled with the rollout decoder (what RL can convert into greedy accuracy), and how
those samples spread (distinct answers, modal sample right, integer error sizes): hits that are
guesses around the answer are not a mode RL can sharpen.
The step-0 evaluation is computed once and shared by the arms (same weights, greedy decoding).

Families and their options are read from the SFT run's config.yaml (the directory above --sft).
Run: OMP_NUM_THREADS=1 python benchmarks/bench_rl_estimators.py [--sft runs/reasoning/sft/hf] [--quick]
Writes benchmarks/results/<--name, default bench_rl_estimators>.{json,md,png} (--quick: <name>_quick.*).
"""

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, write_results
from llada_train.data.prompts import load_rl_rows
from llada_train.data.tasks import row_correct
from llada_train.data.tokenizer import load_tokenizer
from llada_train.decoding import complete
from llada_train.model import LLaDA2MoeModelLM
from llada_train.rl.rollout import LocalRollouts, rollout_step
from llada_train.stages.registry import load_stage_config
from llada_train.stages.rl import rl_response_budget, run_rl
from llada_train.stages.sft import run_sft

ARMS = {  # name -> RL overrides
    "diffu_grpo": ["rl.estimator=diffu_grpo"],
    "ebpo seq N=1": ["rl.estimator=ebpo", "rl.ebpo.ratio_level=sequence", "rl.ebpo.num_timesteps=1"],
    "ebpo seq N=2": ["rl.estimator=ebpo", "rl.ebpo.ratio_level=sequence", "rl.ebpo.num_timesteps=2"],
    "ebpo seq N=4": ["rl.estimator=ebpo", "rl.ebpo.ratio_level=sequence", "rl.ebpo.num_timesteps=4"],
    "ebpo seq N=2 complementary": ["rl.estimator=ebpo", "rl.ebpo.ratio_level=sequence", "rl.ebpo.num_timesteps=2",
                                   "rl.ebpo.complementary=true"],
    "ebpo block N=2": ["rl.estimator=ebpo", "rl.ebpo.ratio_level=block", "rl.ebpo.num_timesteps=2"],
}
START = "no RL (SFT start)"
SFT_ARM = "more SFT (same export)"  # --sft-baseline: the yardstick an RL arm must beat
Z95 = 1.959964


# ---- statistics -----------------------------------------------------------------------------------


def wilson(k: float, n: int) -> tuple[float, float]:
    """95% Wilson interval of a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and normal 95% interval of per-prompt values (paired differences, per-prompt pass@1)."""
    n = len(values)
    mean = sum(values) / max(n, 1)
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    half = Z95 * math.sqrt(var / max(n, 1))
    return mean, mean - half, mean + half


# ---- held-out evaluation --------------------------------------------------------------------------


class HeldoutEval:
    """Trainer `eval_fn` for every arm: per-family greedy accuracy, with the time spent here kept out
    of the arm's training wall-clock. The step-0 result is computed once and shared."""

    def __init__(self, cfg, tokenizer, rows: list[dict], gen_length: int, batch_size: int):
        self.cfg, self.tokenizer, self.rows = cfg, tokenizer, rows
        self.gen_length, self.batch_size = gen_length, batch_size
        self.families = sorted({r["task"] for r in rows})
        self.start: dict | None = None
        self.records: list[dict] = []
        self.arm = ""

    def begin(self, arm: str):
        self.arm, self.clock_start, self.eval_seconds = arm, None, 0.0

    def decode(self, model) -> list[bool]:
        field = self.cfg.data.prompt_field
        done = complete(model, self.tokenizer, [r[field] for r in self.rows], mode=self.cfg.rl.eval_mode,
                        gen_length=self.gen_length, block_length=self.cfg.diffusion.block_size,
                        batch_size=self.batch_size)
        return [row_correct(r, t) for r, t in zip(self.rows, done.texts, strict=True)]

    def __call__(self, engine, step: int) -> dict:
        now = time.perf_counter()
        if self.clock_start is None:
            self.clock_start = now
        train_seconds = now - self.clock_start - self.eval_seconds
        if step == 0 and self.start is not None:
            hits = self.start["hits"]
        else:
            hits = self.decode(engine.module if hasattr(engine, "module") else engine)
            if step == 0:
                self.start = {"hits": hits, "seconds": time.perf_counter() - now}
        self.eval_seconds += time.perf_counter() - now
        record = {"arm": self.arm, "step": step, "train_seconds": round(train_seconds, 2), "hits": hits,
                  **self.per_family(hits)}
        self.records.append(record)
        print(f"[bench] {self.arm} step {step} train {train_seconds:.0f}s: "
              + ", ".join(f"{f} {record[f]['accuracy']:.3f}" for f in self.families), flush=True)
        return {f"accuracy/{f}": record[f]["accuracy"] for f in self.families}

    def per_family(self, hits: list[bool]) -> dict:
        out = {}
        for family in self.families:
            picked = [h for r, h in zip(self.rows, hits, strict=True) if r["task"] == family]
            k, n = sum(picked), len(picked)
            lo, hi = wilson(k, n)
            out[family] = {"accuracy": k / max(n, 1), "ci95": [lo, hi], "n": n}
        return out


def pass_at_k(cfg, tokenizer, model, rows: list[dict], gen_length: int, k: int) -> dict:
    """pass@1 (mean over the k samples) and pass@k (any of them) per family, k completions per
    prompt sampled with the rollout decoder settings (rl.decode_mode, rl.temperature, ...)."""
    field = cfg.data.prompt_field
    executor = LocalRollouts(model, cfg.rl.rollout_decoding(gen_length, cfg.diffusion.block_size))
    executor.publish(model)
    roll = rollout_step(executor, tokenizer, [r[field] for r in rows], group_size=k,
                        prompts_per_chunk=cfg.rl.prompts_per_chunk, seed=cfg.run.seed, step=-1,
                        eos_token_id=model.config.eos_token_id, block_length=cfg.diffusion.block_size)
    hits = [row_correct(rows[i // k], text) for i, text in enumerate(roll.completions)]
    out = {}
    for family in sorted({r["task"] for r in rows}):
        picked = [i for i, r in enumerate(rows) if r["task"] == family]
        per_prompt = [hits[i * k:(i + 1) * k] for i in picked]
        p1, lo1, hi1 = mean_interval([sum(h) / k for h in per_prompt])
        lo1, hi1 = max(lo1, 0.0), min(hi1, 1.0)
        anyk = sum(any(h) for h in per_prompt)
        n = len(per_prompt)
        out[family] = {"n": n, "pass@1": p1, "pass@1_ci95": [lo1, hi1], f"pass@{k}": anyk / n,
                       f"pass@{k}_ci95": list(wilson(anyk, n)),
                       **answer_spread([rows[i] for i in picked],
                                       [roll.completions[i * k:(i + 1) * k] for i in picked])}
    return out


def answer_spread(rows: list[dict], samples: list[list[str]]) -> dict:
    """Whether sampled hits are guesses around the answer or a mode RL can sharpen: distinct answers
    among a prompt's k samples, the share of prompts whose most frequent sample is right, and (integer
    answers) the share of samples |answer - gold| = 0, 1, 2, >= 3."""
    distinct, mode_right, errors = [], 0, [0, 0, 0, 0]
    for row, texts in zip(rows, samples, strict=True):
        texts = [t.strip() for t in texts]
        distinct.append(len(set(texts)))
        mode_right += row_correct(row, max(set(texts), key=texts.count))
        for text in texts:
            with contextlib.suppress(ValueError):  # not an integer answer (or a non-integer sample)
                errors[min(abs(int(text) - int(str(row["answer"]).strip())), 3)] += 1
    n, counted = max(len(rows), 1), max(sum(errors), 1)
    spread = {"distinct_of_k": sum(distinct) / n, "mode_correct": mode_right / n}
    if sum(errors):
        spread["int_abs_error_share"] = {"0": errors[0] / counted, "1": errors[1] / counted, "2": errors[2] / counted,
                                         ">=3": errors[3] / counted}
    return spread


# ---- arms -----------------------------------------------------------------------------------------


def read_sft_run(export: str) -> dict:
    """The config.yaml of the SFT run whose hf/ export is `export` (its families, options, objective)."""
    sft_config = Path(export).parent / "config.yaml"
    if not (Path(export) / "config.json").is_file() or not sft_config.is_file():
        raise SystemExit(f"--sft {export}: expected an SFT export (config.json) inside a run directory "
                         f"with config.yaml ({sft_config}); run `llada-train sft` or the reasoning pipeline")
    return yaml.safe_load(sft_config.read_text())


def base_overrides(args, sft_cfg: dict) -> list[str]:
    families = sft_cfg["data"]["tasks"]
    return [f"model.init_from={args.sft}", f"diffusion.block_size={sft_cfg['diffusion']['block_size']}",
            "data.train=tasks",
            f"data.num_eval={args.heldout * len(families)}", f"train.steps={args.steps}",
            f"train.eval_every={args.eval_every}", f"train.save_every={args.steps}", "train.log_every=1",
            "train.export_hf=false", "rl.ray.enabled=false", *args.set]


def arm_config(args, overrides: list[str], sft_cfg: dict):
    """The RL config of an arm, with the SFT run's families and options (replacing the YAML's: an
    override would merge the option dicts)."""
    cfg = load_stage_config("rl", args.rl_config, overrides)
    cfg.data.tasks = list(sft_cfg["data"]["tasks"])
    cfg.data.task_options = dict(sft_cfg["data"].get("task_options") or {})
    return cfg


def run_arm(name: str, overrides: list[str], args, sft_cfg: dict, evaluator: HeldoutEval, work: Path) -> list:
    """One RL run; returns its metrics.jsonl training records."""
    out = work / name.replace(" ", "_").replace("=", "")
    cfg = arm_config(args, [*overrides, *ARMS[name], f"run.out_dir={out}"], sft_cfg)
    evaluator.begin(name)
    if not run_rl(cfg, eval_fn=evaluator):
        raise RuntimeError(f"arm {name!r} stopped early; see {out}/metrics.jsonl")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_sft_baseline(args, evaluator: HeldoutEval, work: Path) -> None:
    """More SFT (gold answers) from the same export for --sft-baseline-steps, sized to about an RL
    arm's training wall-clock: does RL's reward signal beat simply training on the labels?"""
    out, steps = work / "sft_baseline", args.sft_baseline_steps
    cfg = load_stage_config("sft", args.sft_baseline, [f"model.init_from={args.sft}", f"run.out_dir={out}",
                                                 f"train.steps={steps}", f"optim.lr={args.sft_baseline_lr}",
                                                 f"train.eval_every={steps}", f"train.save_every={steps}"])
    evaluator.begin(SFT_ARM)
    evaluator.clock_start = time.perf_counter()
    if not run_sft(cfg):
        raise RuntimeError(f"{SFT_ARM} stopped early; see {out}/metrics.jsonl")
    evaluator(LLaDA2MoeModelLM.from_pretrained(out / "hf").eval(), steps)


def paired(evaluator: HeldoutEval, hits: list[bool], base: list[bool], family: str) -> str:
    """Mean difference of two arms on the same held-out prompts of `family`, with its 95% interval."""
    diffs = [h - b for r, h, b in zip(evaluator.rows, hits, base, strict=True) if r["task"] == family]
    mean, lo, hi = mean_interval(diffs)
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def summary_rows(evaluator: HeldoutEval, train_logs: dict, reference: str) -> list[dict]:
    """The table: per arm and family, the final accuracy with its interval, the paired gain over the
    start and the paired difference to the `reference` arm."""
    finals = {START: {"hits": evaluator.start["hits"], "step": 0, "train_seconds": 0.0}}
    finals.update({arm: [r for r in evaluator.records if r["arm"] == arm][-1] for arm in train_logs})
    base = finals.get(reference, finals[START])["hits"]
    rows = []
    for arm, final in finals.items():
        log = train_logs.get(arm, [])
        for family in evaluator.families:
            acc = evaluator.per_family(final["hits"])[family]
            rows.append({"arm": arm, "family": family, "n": acc["n"], "accuracy": acc["accuracy"],
                         "acc_ci95": f"[{acc['ci95'][0]:.3f}, {acc['ci95'][1]:.3f}]",
                         "gain_vs_start": paired(evaluator, final["hits"], finals[START]["hits"], family),
                         f"vs_{reference}": paired(evaluator, final["hits"], base, family),
                         "rl_steps": final["step"], "train_s": final["train_seconds"],
                         "reward_last5": mean_interval([r["reward_mean"] for r in log[-5:]])[0]})
    return rows


def plot(evaluator: HeldoutEval, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = evaluator.families
    fig, axes = plt.subplots(len(fams), 2, figsize=(11, 3.6 * len(fams)), squeeze=False)
    arms = list(dict.fromkeys(r["arm"] for r in evaluator.records))
    last_step = max(r["step"] for r in evaluator.records)
    for row, family in enumerate(fams):
        for i, arm in enumerate(arms):
            recs = [r for r in evaluator.records if r["arm"] == arm]
            acc = [r[family]["accuracy"] for r in recs]
            err = [[a - r[family]["ci95"][0] for a, r in zip(acc, recs, strict=True)],
                   [r[family]["ci95"][1] - a for a, r in zip(acc, recs, strict=True)]]
            shift = (i - (len(arms) - 1) / 2) * 0.01 * last_step  # side by side: the intervals overlap
            steps = [r["step"] + shift for r in recs]
            for col, xs in enumerate((steps, [r["train_seconds"] for r in recs])):
                if col == 0 and arm == SFT_ARM:  # its steps are SFT steps: wall-clock panel only
                    continue
                axes[row][col].errorbar(xs, acc, yerr=err, marker="o", capsize=3, label=arm)
        axes[row][0].set(xlabel="RL step", ylabel=f"{family} held-out accuracy")
        axes[row][1].set(xlabel="training wall-clock (s, evaluation excluded)")
        axes[row][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- main -----------------------------------------------------------------------------------------


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sft", default="runs/reasoning/sft/hf",
                   help="SFT export; its run's config.yaml names the families")
    p.add_argument("--rl-config", default="rl_reasoning",
                   help="RL stage YAML or preset name (default: the rl_reasoning preset)")
    p.add_argument("--steps", type=int, default=20, help="RL steps per arm")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--heldout", type=int, default=300, help="held-out problems per family")
    p.add_argument("--pass-k", type=int, default=8)
    p.add_argument("--pass-prompts", type=int, default=150, help="held-out prompts per family for pass@k")
    p.add_argument("--eval-batch", type=int, default=64, help="prompts per greedy decode call")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    p.add_argument("--set", action="append", default=[], help="extra RL override key=value (repeatable)")
    p.add_argument("--name", default="bench_rl_estimators", help="results file stem in benchmarks/results")
    p.add_argument("--reference", default="diffu_grpo", help="arm the paired vs_<arm> column compares with")
    p.add_argument("--sft-baseline", default=None, metavar="SFT_YAML",
                   help="also train the export on with this SFT config (its families) for --sft-baseline-steps")
    p.add_argument("--sft-baseline-steps", type=int, default=300, help="SFT steps (match an RL arm's train_s)")
    p.add_argument("--sft-baseline-lr", type=float, default=5e-4, help="its optim.lr (cosine from a warm-up)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 16 held-out per family, 2 arms")
    args = p.parse_args()
    if args.quick:
        args.steps, args.eval_every, args.heldout, args.pass_prompts = 2, 2, 16, 8
        args.arms = "diffu_grpo,ebpo seq N=2"
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        p.error(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    return args


def main():
    args = parse_args()
    sft_cfg = read_sft_run(args.sft)
    overrides = base_overrides(args, sft_cfg)
    cfg = arm_config(args, overrides, sft_cfg)
    tokenizer = load_tokenizer(args.sft)
    train_rows, heldout = load_rl_rows(cfg.data, cfg.run.seed)
    gen_length = rl_response_budget(cfg, tokenizer, train_rows)
    evaluator = HeldoutEval(cfg, tokenizer, heldout, gen_length, args.eval_batch)
    load = [os.getloadavg()[0]]
    started = time.perf_counter()

    model = LLaDA2MoeModelLM.from_pretrained(args.sft).eval()
    by_family = {f: [r for r in heldout if r["task"] == f] for f in evaluator.families}
    pass_rows = [r for rows in by_family.values() for r in rows[:args.pass_prompts]]
    with torch.no_grad():  # --pass-prompts 0: skipped
        passk = pass_at_k(cfg, tokenizer, model, pass_rows, gen_length, args.pass_k) if pass_rows else {}
    print(f"[bench] pass@k of the start: {json.dumps(passk)}", flush=True)
    del model

    train_logs = {}
    with tempfile.TemporaryDirectory(prefix="bench_rl_estimators_") as work:
        for name in args.arms.split(","):
            records = run_arm(name, overrides, args, sft_cfg, evaluator, Path(work))
            train_logs[name] = [r for r in records if "loss" in r]
            load.append(os.getloadavg()[0])
        if args.sft_baseline:
            run_sft_baseline(args, evaluator, Path(work))
            train_logs[SFT_ARM] = []
            load.append(os.getloadavg()[0])
    rows = summary_rows(evaluator, train_logs, args.reference)
    name = args.name + ("_quick" if args.quick else "")
    budget = cfg.train.batch_size * cfg.rl.group_size
    options = sft_cfg["data"].get("task_options")
    notes = (f"SFT export {args.sft} (families {evaluator.families}, options {options}); RL config "
             f"{args.rl_config} + {overrides[1:]}; {args.steps} RL steps per arm, {cfg.train.batch_size} "
             f"prompts x G={cfg.rl.group_size} = {budget} rollouts per step, seed {cfg.run.seed}, gen_length "
             f"{gen_length}, rollouts {cfg.rl.decode_mode} at temperature {cfg.rl.temperature}; held-out "
             f"accuracy greedy ({cfg.rl.eval_mode}) on the RL held-out rows, 95% Wilson intervals; "
             f"gain_vs_start and vs_{args.reference} = paired mean differences on the same prompts [normal "
             "95% interval]; train_s = "
             "training wall-clock of the arm (evaluation excluded); arms sequential in one process; load "
             "average "
             f"{' -> '.join(f'{x:.1f}' for x in load)} on {os.cpu_count()} cores; total "
             f"{time.perf_counter() - started:.0f} s. "
             + (f"'{SFT_ARM}': {args.sft_baseline} from the export, {args.sft_baseline_steps} steps at lr "
                f"{args.sft_baseline_lr} (its rl_steps column counts SFT steps). " if args.sft_baseline else "")
             + f"pass@1/pass@{args.pass_k} of the start ({args.pass_k} "
             f"sampled completions per prompt, first {args.pass_prompts} held-out prompts per family): "
             f"{json.dumps(passk)}")
    write_results(name, rows, notes)
    payload = json.loads((RESULTS / f"{name}.json").read_text())
    curves = [{**r, "hits": "".join("1" if h else "0" for h in r["hits"])} for r in evaluator.records]
    payload.update({"pass_at_k": passk, "curves": curves, "heldout_tasks": [r["task"] for r in heldout],
                    "train_logs": train_logs, "command": " ".join(sys.argv)})
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    plot(evaluator, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
