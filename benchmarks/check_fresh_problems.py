"""An independent check of an SFT -> RL run on reasoning-gym families: fresh problems, the user's decoder,
reasoning-gym's own verifier.

It reads the families and generator options from OUT/rl/config.yaml, draws problems with its own seed
straight from reasoning-gym (not through the project's data pipeline), drops every problem whose
question appears in a train row of either stage (the SFT and RL train rows are rebuilt from their saved
configs), decodes the rest with `llada-train generate --prompts F --out F --mode Q` from OUT/sft/hf and
OUT/rl/hf, and scores each completion with the dataset's `score_answer` against the generator's answer.
Prints and writes accuracy per family and model with 95% Wilson intervals, and RL - SFT as a paired
mean difference with its normal 95% interval (same problems); when the SFT stage learnt from imperfect
teachers (`data.teacher`), also on the fresh problems where a teacher's bug shows and on the rest.

Run: python benchmarks/check_fresh_problems.py --run runs/reasoning [--per-family 300] [--seed 777]
Writes OUT/fresh_check.{json,md} and the decoded files OUT/fresh_check/{prompts,sft,rl}.jsonl.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_rl_estimators import wilson
from llada_train.data.reasoning_gym import _dataset, _options_key  # the option typing (Enum lists) only
from llada_train.data.tasks import make_rows
from llada_train.report import paired_gain as paired


def seen_questions(run: Path) -> set[str]:
    """Every question of a train row of the SFT and RL stages, rebuilt from their saved configs."""
    seen = set()
    for stage in ("sft", "rl"):
        cfg = yaml.safe_load((run / stage / "config.yaml").read_text())
        d = cfg["data"]
        rows = make_rows(list(d["tasks"]), d["num_train"], split="train", seed=cfg["run"]["seed"],
                         kind="sft" if stage == "sft" else "rl", **(d.get("task_options") or {}))
        seen |= {r["messages"][0]["content"] if "messages" in r else r["prompt"] for r in rows}
    return seen


def fresh_problems(task: str, options: dict, n: int, seed: int, seen: set[str]) -> list[dict]:
    """`n` distinct problems of `task` from reasoning-gym with this seed, none of them in `seen`."""
    name = task.removeprefix("rg:")
    data = _dataset(name, _options_key(options), seed, 200 * n)
    out, questions = [], set()
    for i in range(len(data)):
        entry = data[i]
        if entry["question"] not in seen and entry["question"] not in questions:
            questions.add(entry["question"])
            out.append({"prompt": entry["question"], "task": task, "entry": json.dumps(entry, default=str)})
            if len(out) == n:
                return out
    raise SystemExit(f"{task}: only {len(out)} fresh problems outside the train rows; ask for fewer (--per-family)")


def decode(model: Path, prompts: Path, out: Path) -> list[str]:
    subprocess.run(["llada-train", "generate", "--model", str(model), "--prompts", str(prompts), "--out", str(out),
                    "--mode", "Q", "--batch-size", "32"], check=True)
    return [json.loads(line)["completion"] for line in out.read_text().splitlines()]


def verify(task: str, options: dict, completion: str, entry: str) -> bool:
    """reasoning-gym's own verdict on the answer part of a completion (the text before any markup)."""
    data = _dataset(task.removeprefix("rg:"), _options_key(options))
    return data.score_answer(completion.split("<", 1)[0].strip(), json.loads(entry)) >= 1.0


def compare(name: str, idx: list[int], right: dict) -> dict:
    """Accuracy of SFT and RL on the problems `idx` (Wilson 95%) and the paired RL - SFT gain."""
    sft, after = [right["sft"][i] for i in idx], [right["rl"][i] for i in idx]
    gain = paired(sft, after)
    return {"family": name, "n": len(idx), "sft": sum(sft) / len(idx), "sft_ci95": wilson(sum(sft), len(idx)),
            "rl": sum(after) / len(idx), "rl_ci95": wilson(sum(after), len(idx)), "gain": gain[0],
            "gain_ci95": gain[1:]}


def teacher_subsets(run: Path, problems: list[dict]) -> list[tuple[str, list[int]]]:
    """Per teacher of the SFT stage (`data.teacher`): its family's fresh problems where its bug shows (its
    answer would differ from gold), and the rest."""
    from llada_train.teachers import TEACHERS, bug_shows

    teacher = yaml.safe_load((run / "sft" / "config.yaml").read_text())["data"].get("teacher") or []
    names = [teacher] if isinstance(teacher, str) else list(teacher)
    if not names:
        return []
    as_rows = [{"task": r["task"], "rg_entry": r["entry"], "prompt": r["prompt"],
                "answer": json.loads(r["entry"])["answer"]} for r in problems]  # the fields a teacher reads
    subsets = []
    for name in names:
        family = [i for i, r in enumerate(problems) if r["task"] == TEACHERS[name].task]
        bug = [i for i in family if bug_shows(name, as_rows[i])]
        subsets += [(f"`{TEACHERS[name].task}` where `{name}`'s bug shows", bug),
                    (f"`{TEACHERS[name].task}` where `{name}` is right", sorted(set(family) - set(bug)))]
    return subsets


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True, help="pipeline run directory with sft/ and rl/")
    p.add_argument("--per-family", type=int, default=300)
    p.add_argument("--seed", type=int, default=777, help="reasoning-gym seed of the fresh problems")
    args = p.parse_args()
    rl = yaml.safe_load((args.run / "rl" / "config.yaml").read_text())["data"]
    options = rl.get("task_options") or {}
    seen = seen_questions(args.run)
    work = args.run / "fresh_check"
    work.mkdir(exist_ok=True)
    problems = [row for task in rl["tasks"]
                for row in fresh_problems(task, options.get(task, {}), args.per_family, args.seed, seen)]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in problems))
    right = {}
    for stage in ("sft", "rl"):
        texts = decode(args.run / stage / "hf", work / "prompts.jsonl", work / f"{stage}.jsonl")
        right[stage] = [verify(r["task"], options.get(r["task"], {}), t, r["entry"]) for r, t in zip(problems, texts,
                                                                                                    strict=True)]
    subsets = [(f"`{task}`", [i for i, r in enumerate(problems) if r["task"] == task]) for task in rl["tasks"]]
    rows = [compare(name, idx, right) for name, idx in subsets + teacher_subsets(args.run, problems)]
    lines = [f"Fresh problems (reasoning-gym seed {args.seed}, none in a train row of either stage), decoded with "
             "`llada-train generate --mode Q`, scored by each dataset's `score_answer`:", "",
             "| family | n | SFT | RL | RL − SFT [95%, paired] |", "|---|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['n']} | {r['sft']:.3f} [{r['sft_ci95'][0]:.3f}, {r['sft_ci95'][1]:.3f}] | "
              f"{r['rl']:.3f} [{r['rl_ci95'][0]:.3f}, {r['rl_ci95'][1]:.3f}] | "
              f"{r['gain']:+.3f} [{r['gain_ci95'][0]:+.3f}, {r['gain_ci95'][1]:+.3f}] |" for r in rows]
    (args.run / "fresh_check.md").write_text("\n".join(lines) + "\n")
    (args.run / "fresh_check.json").write_text(json.dumps({"seed": args.seed, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
