"""`llada-train report RUN_DIR`: what a pipeline run did, as report.md + PNG plots.

Reads every stage's metrics.jsonl (losses, rewards, accuracy), then re-scores the SFT and RL
exports on the RL stage's held-out prompts with both decoding presets, so the table compares
the models and the S/Q trade-off on the same prompts: exact-match accuracy, tokens per forward.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from .errors import UserError

PLOTS = {"loss": "loss.png", "rl": "rl.png", "decoding": "decoding.png"}
SAMPLES = 6  # held-out prompts shown with their generations


def read_metrics(stage_dir: Path) -> list[dict]:
    """metrics.jsonl records, the last one winning for a step logged twice (a resumed run)."""
    path = stage_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        key = (rec.get("step"), tuple(sorted(k for k in rec if k.startswith("eval/"))))
        by_step[key] = {**by_step.get(key, {}), **rec}
    return sorted(by_step.values(), key=lambda r: r.get("step", 0))


def series(records: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def score_model(model_dir: Path, rows: list[dict], prompt_field: str, mode: str) -> dict:
    """Greedy threshold decoding of every held-out prompt: accuracy, tokens per forward, samples."""
    from .data.tasks import is_checkable, row_correct
    from .data.tokenizer import load_tokenizer
    from .decoding import complete, load_decode_defaults
    from .model import LLaDA2MoeModelLM

    model = LLaDA2MoeModelLM.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    defaults = load_decode_defaults(model_dir)
    lengths = {k: defaults[k] for k in ("gen_length", "block_length") if k in defaults}
    with torch.no_grad():
        done = complete(model, tokenizer, [r[prompt_field] for r in rows], mode=mode, batch_size=32, **lengths)
    texts, tpf = done.texts, done.tokens_per_forward
    right = [row_correct(r, t) if is_checkable(r) else t.strip() == str(r["answer"]).strip()
             for r, t in zip(rows, texts, strict=True)]
    return {"accuracy": sum(right) / max(1, len(right)), "tpf": sum(tpf) / max(1, len(tpf)), "texts": texts,
            "right": right}


def paired_gain(before: list[bool], after: list[bool]) -> tuple[float, float, float]:
    """Mean of after - before over the same prompts and its 95% interval (normal approximation of
    the paired difference: the per-prompt differences' standard error, so the shared prompts'
    difficulty cancels; McNemar-style, tighter than treating the two accuracies as independent)."""
    n = len(before)
    assert n == len(after) and n > 0, (n, len(after))
    diffs = [float(a) - float(b) for b, a in zip(before, after, strict=True)]
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1)
    half = 1.96 * (var / n) ** 0.5
    return mean, mean - half, mean + half


def gain_lines(rows: list[dict], sft_right: list[bool], rl_right: list[bool],
               subsets: tuple[tuple[str, list[int]], ...] = ()) -> list[str]:
    """Markdown lines: RL - SFT exact match per family, per extra subset (label, row indices) and
    overall, with n and the paired 95% interval."""
    families = sorted({str(r.get("task", "all")) for r in rows})
    groups = [(f, [i for i, r in enumerate(rows) if str(r.get("task", "all")) == f]) for f in families]
    groups += [(label, idx) for label, idx in subsets if idx]
    if len(groups) > 1:
        groups.append(("all", list(range(len(rows)))))
    lines = ["| family | n | SFT | RL | RL - SFT | 95% interval (paired) |", "|---|---|---|---|---|---|"]
    for family, idx in groups:
        before, after = [sft_right[i] for i in idx], [rl_right[i] for i in idx]
        mean, lo, hi = paired_gain(before, after)
        lines.append(f"| {family} | {len(idx)} | {sum(before) / len(idx):.3f} | {sum(after) / len(idx):.3f} | "
                     f"{mean:+.3f} | [{lo:+.3f}, {hi:+.3f}] |")
    return lines


def _plot_losses(run_dir: Path, out: Path, stages: list[str]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        records = read_metrics(run_dir / stage)
        for key, label in (("loss", "train"), ("eval/loss", "held-out")):
            x, y = series(records, key)
            if x:
                ax.plot(x, y, marker="o" if key.startswith("eval") else None, label=label)
        ax.set(title=f"{stage} loss", xlabel="step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_rl(records: list[dict], out: Path):
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    per_fn = sorted({k for r in records for k in r if k.startswith("reward/") and k.endswith("/mean")})
    for key in per_fn if len(per_fn) > 2 else [k for k in per_fn if k == "reward/total/mean"] or per_fn:
        x, y = series(records, key)
        left.plot(x, y, alpha=0.35)
        window = max(1, len(y) // 8)  # a running mean shows the trend through the per-step noise
        left.plot(x, [sum(y[max(0, i - window + 1):i + 1]) / len(y[max(0, i - window + 1):i + 1])
                      for i in range(len(y))], color=left.lines[-1].get_color(), label=f"{key} (running mean)")
    left.set(title="rollout reward", xlabel="RL step")
    left.legend()
    for key in sorted({k for r in records for k in r if k.startswith("eval/") and "accuracy" in k}):
        right.plot(*series(records, key), marker="o", label=key)
    right.set(title="held-out accuracy", xlabel="RL step")
    right.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_decoding(scores: dict, out: Path):
    import matplotlib.pyplot as plt

    labels = list(scores)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.bar(labels, [scores[k]["tpf"] for k in labels], color="tab:blue")
    left.set(title="tokens per forward", ylabel="TPF")
    right.bar(labels, [scores[k]["accuracy"] for k in labels], color="tab:green")
    right.set(title="held-out exact match", ylim=(0, 1))
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def retention_lines(run_dir: Path, settings) -> list[str]:
    """A pipeline that started from an AR model (`convert:`): the knowledge-retention table of the source and
    the last stage's export (and the converted model with `retention.converted`). `settings`:
    from_ar.RetentionReport; None reuses the run's retention.json."""
    from .retention import DEFAULT_MODES, evaluate_retention, markdown
    from .stages.from_ar import converted_dir, source_dir

    saved = run_dir / "retention.json"
    if settings is not None:
        last = [run_dir / s / "hf" for s in ("cpt", "sft", "rl") if (run_dir / s / "hf" / "config.json").is_file()]
        before = [converted_dir(run_dir)] if settings.converted else []
        result = evaluate_retention(source_dir(run_dir), [*before, *last[-1:]],
                                    modes=settings.modes or DEFAULT_MODES, limit=settings.limit,
                                    gen_length=settings.gen_length, block_length=settings.block_length)
        saved.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    elif saved.is_file():
        result = json.loads(saved.read_text())
    else:
        return []
    return ["## Knowledge retention (the AR source's questions kept)", "", markdown(result),
            "Retention = of the questions the source answers right, the share the model answers right too "
            "(docs/smollm2.md). Every answer: `retention.json`.", ""]


def write_report(run_dir, retention=None) -> Path:
    """`retention`: the pipeline's `retention:` settings, when it started from an AR model."""
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    stages = [s for s in ("cpt", "sft", "rl") if (run_dir / s / "metrics.jsonl").is_file()]
    if not stages:
        raise UserError(f"{run_dir}: no stage directories with metrics.jsonl (expected cpt/, sft/, rl/)")
    lines = [f"# llada-train report: `{run_dir}`", ""]
    _plot_losses(run_dir, run_dir / PLOTS["loss"], stages)
    lines += ["## Training loss", "", f"![loss]({PLOTS['loss']})", ""]
    for stage in stages:
        records = read_metrics(run_dir / stage)
        _, train = series(records, "loss")
        _, held = series(records, "eval/loss")
        if train:
            held_text = f"; held-out {held[0]:.3f} -> {held[-1]:.3f}" if held else ""
            lines.append(f"- **{stage}**: {len(train)} logged steps, train loss {train[0]:.3f} -> {train[-1]:.3f}"
                         f"{held_text}")
    lines.append("")
    lines += retention_lines(run_dir, retention)
    if "rl" in stages:
        _plot_rl(read_metrics(run_dir / "rl"), run_dir / PLOTS["rl"])
        lines += ["## RL (EBPO)", "", f"![rl]({PLOTS['rl']})", ""]
    models = {s: run_dir / s / "hf" for s in ("sft", "rl") if (run_dir / s / "hf" / "config.json").is_file()}
    if models and (run_dir / "rl" / "config.yaml").is_file():
        from .data.prompts import load_heldout_rows
        from .stages.registry import load_stage_config

        rl_cfg = load_stage_config("rl", str(run_dir / "rl" / "config.yaml"))  # the RL stage's own held-out prompts
        rows, field = load_heldout_rows(rl_cfg.data, rl_cfg.run.seed), rl_cfg.data.prompt_field
        scores = {f"{s.upper()} {mode}": score_model(path, rows, field, mode) for s, path in models.items()
                  for mode in ("S", "Q")}
        _plot_decoding(scores, run_dir / PLOTS["decoding"])
        lines += [f"## Held-out accuracy ({len(rows)} prompts, greedy threshold decoding)", "",
                  "| model | mode | exact match | tokens per forward |", "|---|---|---|---|"]
        lines += [f"| {k.split()[0]} | {k.split()[1]} | {v['accuracy']:.3f} | {v['tpf']:.2f} |"
                  for k, v in scores.items()]
        if len(models) == 2:
            teacher, subsets = _teacher_subsets(run_dir, rows, rl_cfg)
            lines += ["", "## RL gain over SFT (Q mode, same prompts)", "",
                      *gain_lines(rows, scores["SFT Q"]["right"], scores["RL Q"]["right"], subsets)]
            lines += ["", teacher] if teacher else []
        lines += ["", f"![decoding]({PLOTS['decoding']})", "", "## Sample generations (Q mode)", "",
                  "| prompt | answer | " + " | ".join(f"{s.upper()}" for s in models) + " |",
                  "|---|---|" + "---|" * len(models)]
        for i, row in enumerate(rows[:SAMPLES]):
            cells = [_cell(scores[f"{s.upper()} Q"]["texts"][i]) + (" ✓" if scores[f"{s.upper()} Q"]["right"][i]
                                                                     else " ✗") for s in models]
            lines.append(f"| {_cell(str(row[field]))} | {_cell(str(row['answer']))} | " + " | ".join(cells) + " |")
        (run_dir / "heldout_scores.json").write_text(json.dumps(
            {k: {"accuracy": v["accuracy"], "tpf": v["tpf"]} for k, v in scores.items()}, indent=1))
    out = run_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def _teacher_subsets(run_dir: Path, rows: list[dict], rl_cfg) -> tuple[str, tuple]:
    """When the SFT stage learnt from an imperfect teacher (`data.teacher`): one sentence on what its
    data lacked and what RL used, and the held-out rows where the teacher's bug shows vs the rest."""
    from .stages.registry import load_stage_config
    from .teachers import TEACHERS, bug_shows

    sft_config = run_dir / "sft" / "config.yaml"
    if not sft_config.is_file():
        return "", ()
    data = load_stage_config("sft", str(sft_config)).data
    if not data.teachers:
        return "", ()
    rewards = ", ".join(f"`{spec.fn.rsplit(':', 1)[-1]}`" for spec in rl_cfg.rl.rewards)
    families = {TEACHERS[name].task for name in data.teachers}
    family = [i for i, r in enumerate(rows) if r.get("task") in families]
    bug = [i for i in family if any(bug_shows(name, rows[i]) for name in data.teachers)]
    rest = sorted(set(family) - set(bug))
    taught = "; ".join(f"its `{TEACHERS[name].task}` answers came from a teacher that {TEACHERS[name].bug}"
                       for name in data.teachers)
    sentence = (f"What the SFT data lacked: {taught}, on {data.teacher_error_rate:.0%} of the problems where "
                f"that bug shows (`data.teacher: {data.teachers}`); what RL used: its reward ({rewards}) compares "
                "each rollout with the generator's gold answer, the signal those labels did not carry.")
    return sentence, (("teacher's bug shows", bug), ("teacher right", rest))


def _cell(text: str) -> str:
    return "`" + text.replace("|", "\\|").replace("\n", " ").replace("`", "'")[:60] + "`"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llada-train report", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a pipeline run directory (holding cpt/, sft/, rl/)")
    args = parser.parse_args(argv)
    print(write_report(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
