"""`llada-train eval` (lm-evaluation-harness) and `eval-tasks`: the harness scores a reasoning-gym
family exactly as `generate --prompts` + `score_answer` do; the ELBO behind `loglikelihood` matches
a float64 brute force within its own standard error and ranks trained answers first."""

import json
import math
from itertools import combinations

import pytest
import torch
import yaml

from llada_train.data.reasoning_gym import is_correct
from llada_train.data.tokenizer import load_tokenizer
from llada_train.eval_cli import main as eval_main
from llada_train.eval_cli import tasks_main
from llada_train.generate_cli import main as generate_main
from llada_train.harness import DiffusionLM
from tests.test_cpt import cli

AIW = {"task_types": ["siblings", "friends"], "task_type_weights": [0.5, 0.5]}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny SFT export that has memorised 24 riddles (gold answers)."""
    run = tmp_path_factory.mktemp("sft")
    res = cli("sft", "--config", "configs/sft_tiny.yaml", "model.init_from=", f"run.out_dir={run}",
              "data.tasks=[rg:aiw]", f"data.task_options={json.dumps({'rg:aiw': AIW})}", "data.max_len=104",
              "data.num_train=24", "data.num_eval=0", "diffusion.mtf.prob=0", "train.steps=100",
              "train.batch_size=8", "train.eval_every=1000", "train.save_every=1000")
    assert res.returncode == 0, res.stderr[-3000:]
    return run


def test_harness_accuracy_equals_generate_and_score_answer_row_by_row(sft_run, tmp_path):
    tasks = tmp_path / "tasks"
    assert tasks_main(["--config", str(sft_run / "config.yaml"), "--out", str(tasks), "--n", "24"]) == 0
    out = tmp_path / "results.json"
    assert eval_main(["--model", str(sft_run / "hf"), "--tasks", "rg_aiw", "--include-path", str(tasks),
                      "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    samples = (tmp_path / "results.json.samples" / "rg_aiw.jsonl").read_text().splitlines()
    samples = [json.loads(line) for line in samples]
    assert generate_main(["--model", str(sft_run / "hf"), "--prompts", str(tasks / "rg_aiw.jsonl"),
                          "--out", str(tmp_path / "gen.jsonl")]) == 0
    generated = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert len(samples) == len(generated) == 24
    by_doc = {s["doc_id"]: s for s in samples}
    for i, row in enumerate(generated):
        assert by_doc[i]["doc"]["prompt"] == row["prompt"]
        assert by_doc[i]["filtered_resps"][0] == row["completion"]  # the same decoding, token for token
        assert by_doc[i]["acc"] == float(is_correct(row, row["completion"]))
    accuracy = sum(is_correct(r, r["completion"]) for r in generated) / len(generated)
    assert results["results"]["rg_aiw"]["acc,none"] == pytest.approx(accuracy, abs=1e-12)
    extra = results["llada_train"]
    assert extra["generated_tokens"] == sum(r["length"] for r in generated)
    assert extra["tokens_per_forward"] == pytest.approx(extra["generated_tokens"] / sum(r["nfe"] for r in generated))


def test_multiple_choice_through_the_elbo_picks_the_memorised_answers(sft_run, tmp_path):
    rows = _train_rows(sft_run)
    docs = [{"question": r["messages"][0]["content"],
             "choices": [r["answer"], str(int(r["answer"]) + 7), "cat"]} for r in rows]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "mc.yaml").write_text(yaml.safe_dump({
        "task": "aiw_mc", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "mc.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": 0, "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    out = tmp_path / "mc.json"
    assert eval_main(["--model", str(sft_run / "hf"), "--tasks", "aiw_mc", "--include-path", str(tmp_path),
                      "--out", str(out), "--mc-samples", "16"]) == 0
    results = json.loads(out.read_text())
    assert results["results"]["aiw_mc"]["acc,none"] >= 0.8  # chance is 1/3
    scored = results["llada_train"]["loglikelihood"]
    assert len(scored) == 3 * len(docs) and all(s["standard_error"] > 0 for s in scored)


def _train_rows(run):
    from llada_train.stages.registry import load_stage_config
    from llada_train.stages.sft import load_sft_splits

    train, _ = load_sft_splits(load_stage_config("sft", str(run / "config.yaml"), []))
    return train.rows


def _exact_elbo(model, context: list[int], continuation: list[int], mask_id: int) -> float:
    """Σ over every nonempty mask set M of the continuation: ∫ t^(k-1) (1-t)^(L-k) dt · Σ_{i∈M}
    log p(y_i | M masked), in float64, with one bidirectional forward per M (one block holds it all)."""
    n = len(continuation)
    total = 0.0
    for k in range(1, n + 1):
        weight = math.factorial(k - 1) * math.factorial(n - k) / math.factorial(n)  # Beta(k, n - k + 1)
        for masked in combinations(range(n), k):
            noisy = context + [mask_id if i in masked else y for i, y in enumerate(continuation)]
            with torch.no_grad():
                logits = model(torch.tensor([noisy])).logits[0].double()  # (L, V)
            logp = torch.log_softmax(logits, -1)
            total += weight * sum(float(logp[len(context) + i, continuation[i]]) for i in masked)
    return total


def test_elbo_estimate_agrees_with_a_float64_brute_force_within_its_standard_error(tiny_model):
    model = tiny_model.double()
    tok = load_tokenizer(None)
    lm = DiffusionLM(model, tok, decode={"mode": "Q", "block_length": 8, "gen_length": 8}, block_size=8,
                     mc_samples=1024, seed=3)
    generator = torch.Generator().manual_seed(11)
    pairs = [(torch.randint(0, 200, (c,), generator=generator).tolist(),
              torch.randint(0, 200, (8 - c,), generator=generator).tolist()) for c in (3, 4, 5)]
    estimates = lm._elbo_pairs(pairs, disable_tqdm=True)
    for (context, continuation), (value, error) in zip(pairs, estimates, strict=True):
        exact = _exact_elbo(model, context, continuation, model.config.mask_token_id)
        assert 0 < error < 0.08 * abs(exact)  # tight enough that dropping the 1/t weight fails
        assert abs(value - exact) < 3.5 * error, (value, exact, error)


def test_rolling_loglikelihood_of_a_short_text_is_the_elbo_after_the_separator(tiny_model):
    tok = load_tokenizer(None)
    text = "The cat sat on the mat and looked at the door."

    def fresh():
        return DiffusionLM(tiny_model, tok, decode={"mode": "Q", "block_length": 8, "gen_length": 8},
                           block_size=8, mc_samples=8, seed=5)

    class Request:
        def __init__(self, *args):
            self.args = args

    rolling = fresh().loglikelihood_rolling([Request(text)], disable_tqdm=True)[0]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    direct = fresh()._elbo_pairs([([tok.eos_token_id], ids)], disable_tqdm=True)[0][0]
    assert rolling == direct
    long, seen = fresh(), []
    long.max_length = 8  # the text no longer fits: disjoint windows, each token scored once
    score = long._elbo_pairs
    long._elbo_pairs = lambda pairs, disable_tqdm: seen.extend(pairs) or score(pairs, disable_tqdm)
    assert math.isfinite(long.loglikelihood_rolling([Request(text)], disable_tqdm=True)[0])
    assert len(seen) > 1 and [t for _, y in seen for t in y] == ids
    stream = [tok.eos_token_id, *ids]
    start = 1  # each window: the tokens right before it as context, then its own
    for context, continuation in seen:
        assert stream[start - len(context):start] == context and len(context) + len(continuation) <= 8
        start += len(continuation)
