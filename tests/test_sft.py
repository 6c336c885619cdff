"""SFT: the objective on chat batches (prompt untouched, MTF drafts, mtf.prob 0 = plain), the
stage through the CLI (learning, LoRA adapters only + merged export, malformed rows), config errors."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from llada_train.config import (
    ConfigError,
    DiffusionConfig,
    LossConfig,
    MTFConfig,
    NoiseConfig,
    T2TConfig,
)
from llada_train.data.chat import tokenize_chat
from llada_train.data.tasks import make_rows, write_jsonl
from llada_train.data.tokenizer import load_tokenizer, special_token_ids
from llada_train.diffusion import (
    corrupt_t2t,
    diffusion_loss,
    noise_batch,
    noisy_forward,
    ordinary_token_ids,
    supervised_positions,
    training_loss,
)
from llada_train.model import LLaDA2MoeModelLM
from llada_train.stages.registry import load_stage_config
from llada_train.stages.sft import apply_lora, load_sft_splits
from tests.conftest import tiny_config
from tests.test_cpt import cli
from tests.test_diffusion import reference_loss

MASK_ID = 1
BLOCK = 8


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def chat_batch(tok):
    """Four rendered task conversations, EOS-padded to a common block multiple: (B, L) tensors."""
    rows = make_rows(["addition", "reversal"], 4, split="train", seed=0, kind="sft")
    ds = tokenize_chat(rows, tok, block_size=BLOCK, max_len=None)
    batch = ds.collate(list(ds))
    assert (~batch["response_mask"]).any(1).all() and batch["response_mask"].any(1).all()
    return batch["input_ids"], batch["response_mask"], batch["doc_ids"]


def mixed_cfg(**mtf) -> DiffusionConfig:
    return DiffusionConfig(block_size=BLOCK, noise=NoiseConfig(complementary=True),
                           loss=LossConfig(weighting="elbo", confidence_weight=0.1),
                           t2t=T2TConfig(max_ratio=0.5, weight=1.0, keep_weight=0.1), mtf=MTFConfig(**mtf))


def record_forwards(model) -> tuple[list, list]:
    """(model call kwargs, lm_head input hidden states) of every forward; the hidden states keep
    their gradient when they have one."""
    calls = []

    def keep_hidden(module, args):
        if args[0].requires_grad:
            args[0].retain_grad()
        calls[-1].append(args[0])

    hooks = [model.register_forward_pre_hook(lambda m, a, kw: calls.append([kw]), with_kwargs=True),
             model.lm_head.register_forward_pre_hook(keep_hidden)]
    return calls, hooks


@torch.no_grad()
def full_logits(model, kwargs) -> torch.Tensor:
    """The logits at every position of a recorded call (same inputs, eval mode: deterministic)."""
    inputs = {k: kwargs[k] for k in ("input_ids", "attention_mask", "position_ids")}
    return model(**inputs).logits  # (B, 2L, V)


def vocab(tok):
    return ordinary_token_ids(len(tok), special_token_ids(tok))


def test_prompt_positions_get_exactly_zero_gradient(tiny_model, chat_batch, tok):
    """Full mixed objective (complementary, T2T, keep, CAP, 3-turn MTF): the prompt is never
    noised, replaced or drafted in any turn, and no prompt, padding or clean-half position reaches
    the lm_head (so its gradient is exactly 0); d loss / d hidden is nonzero at every response
    position (keep_weight > 0 supervises all of them)."""
    ids, resp, doc = chat_batch
    tiny_model.train()
    calls, hooks = record_forwards(tiny_model)
    loss, metrics = training_loss(tiny_model, ids, resp, doc, doc >= 0, mixed_cfg(prob=1.0, turns=3), step=0,
                                  mask_id=MASK_ID, vocab_ids=vocab(tok), generator=torch.Generator().manual_seed(0))
    loss.backward()
    for h in hooks:
        h.remove()
    seq_len = ids.shape[1]
    x0, resp2 = torch.cat([ids, ids]), torch.cat([resp, resp])
    assert len(calls) == 3 and metrics["mtf"] == 1  # two drafting turns, one training turn
    for kwargs, _ in calls:
        inputs, projected = kwargs["input_ids"], kwargs["output_positions"]
        assert torch.equal(inputs[:, seq_len:], x0)
        assert torch.equal(inputs[:, :seq_len][~resp2], x0[~resp2])
        assert not projected[:, seq_len:].any() and not projected[:, :seq_len][~resp2].any()
    assert torch.equal(calls[-1][0]["output_positions"][:, :seq_len], resp2)
    grad = calls[-1][1].grad  # (N, H), N = response positions
    assert (grad.abs().sum(-1) > 0).all()


def test_mtf_turn_two_trains_on_the_turn_one_draft(tiny_model, chat_batch, tok):
    """Turn 2's input holds turn 1's argmax at drafted positions (the rest unchanged); the loss
    equals a float64 re-computation with M2T at the remaining masks and T2T at the drafted
    positions towards the original tokens."""
    ids, resp, doc = chat_batch
    cfg = mixed_cfg(prob=1.0, turns=2, draft_ratio=1.0)
    cfg.t2t.max_ratio, cfg.loss.weighting, cfg.loss.confidence_weight = 0.0, "uniform", 0.0
    calls, hooks = record_forwards(tiny_model)
    loss, _ = training_loss(tiny_model, ids, resp, doc, doc >= 0, cfg, step=0, mask_id=MASK_ID,
                            vocab_ids=vocab(tok), generator=torch.Generator().manual_seed(1))
    for h in hooks:
        h.remove()
    (kw1, _), (kw2, _) = calls
    (ids1, logits1), (ids2, logits2) = ((kw["input_ids"], full_logits(tiny_model, kw)) for kw in (kw1, kw2))
    seq_len = ids.shape[1]
    x0, resp2 = torch.cat([ids, ids]), torch.cat([resp, resp])
    xt1, xt2 = ids1[:, :seq_len], ids2[:, :seq_len]
    masked1 = xt1 == MASK_ID
    drafted = masked1 & (xt2 != MASK_ID)
    still = xt2 == MASK_ID
    draft = logits1[:, :seq_len].argmax(-1)
    assert torch.equal(xt2[~masked1], xt1[~masked1])
    assert torch.equal(xt2[drafted], draft[drafted])
    assert drafted.any() and still.any() and (draft[drafted] != x0[drafted]).any()  # real (wrong) drafts
    ref = reference_loss(logits2[:, :seq_len], x0, resp2, still, drafted, torch.ones(x0.shape, dtype=torch.float64),
                         cfg)
    assert math.isclose(loss.item(), ref, rel_tol=1e-5)


def test_mtf_prob_zero_is_the_plain_objective_bit_for_bit(tiny_model, chat_batch, tok):
    ids, resp, doc = chat_batch
    cfg = mixed_cfg(prob=0.0, turns=3, draft_ratio=0.5)
    calls, hooks = record_forwards(tiny_model)
    loss, metrics = training_loss(tiny_model, ids, resp, doc, doc >= 0, cfg, step=0, mask_id=MASK_ID,
                                  vocab_ids=vocab(tok), generator=torch.Generator().manual_seed(2))
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(2)
    batch = noise_batch(ids, resp, doc, doc >= 0, BLOCK, cfg, MASK_ID, g)
    batch = corrupt_t2t(batch, cfg.t2t.max_ratio, vocab(tok), g)
    supervised = supervised_positions(batch, cfg)
    out = noisy_forward(tiny_model, batch, BLOCK, MASK_ID, supervised, batch.x0[supervised], with_entropy=True)
    plain, plain_metrics = diffusion_loss(out, batch, supervised, cfg)
    assert len(calls) == 1 and metrics["mtf"] == 0
    assert torch.equal(loss, plain)
    for key in ("m2t", "t2t", "keep", "confidence"):
        assert torch.equal(metrics[key], plain_metrics[key])


def evals(run_dir) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval/loss" in r]


def test_tiny_sft_from_scratch_lowers_held_out_loss_and_exports(tmp_path):
    run = tmp_path / "run"
    res = cli("sft", "--config", "configs/sft_tiny.yaml", "model.init_from=", f"run.out_dir={run}",
              "data.num_train=400", "data.num_eval=16", "train.steps=30", "train.batch_size=8", "train.eval_every=30",
              "train.eval_batches=1", "train.log_every=10", "train.save_every=1000")
    assert res.returncode == 0, res.stderr[-3000:]
    first, last = evals(run)[0], evals(run)[-1]
    assert (first["step"], last["step"]) == (0, 30)
    assert last["eval/loss"] < 0.6 * first["eval/loss"], (first, last)
    assert 0 <= last["eval/accuracy"] <= 1 and last["eval/tokens_per_forward"] > 0
    logged = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "m2t" in r]
    assert {"m2t", "t2t", "keep", "mtf", "loss"} <= set(logged[-1])
    model = AutoModelForCausalLM.from_pretrained(run / "hf")
    assert isinstance(model, LLaDA2MoeModelLM)
    saved = json.loads((run / "hf" / "generation_config.json").read_text())
    assert saved["block_length"] == BLOCK and saved["gen_length"] % BLOCK == 0


def test_lora_trains_only_adapters_and_merged_export_matches_peft(tmp_path, tok):
    base_dir, run = tmp_path / "base", tmp_path / "run"
    torch.manual_seed(0)
    LLaDA2MoeModelLM(tiny_config()).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    base = LLaDA2MoeModelLM.from_pretrained(base_dir)
    res = cli("sft", "--config", "configs/sft_tiny_lora.yaml", f"model.init_from={base_dir}", f"run.out_dir={run}",
              "data.num_train=64", "data.num_eval=0", "train.steps=3", "train.batch_size=8", "train.save_every=1000")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LoRA:" in res.stdout + res.stderr
    trained = torch.load(run / "checkpoints" / "step_000003" / "engine" / "mp_rank_00_model_states.pt",
                         weights_only=False)["module"]
    base_state = base.state_dict()
    adapters = {k: v for k, v in trained.items() if ".lora_" in k}
    frozen = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in trained.items()
              if ".lora_" not in k}
    assert set(frozen) == set(base_state)
    for key, value in frozen.items():
        assert torch.equal(value, base_state[key]), key  # base weights and router biases untouched
    assert any(".experts." in k for k in adapters) and any("query_key_value" in k for k in adapters)
    assert all(v.abs().sum() > 0 for k, v in adapters.items() if ".lora_B." in k)  # B starts at zero

    cfg = load_stage_config("sft", "configs/sft_tiny_lora.yaml", [f"model.init_from={base_dir}"])
    peft_model = apply_lora(LLaDA2MoeModelLM.from_pretrained(base_dir), cfg.lora)
    peft_model.load_state_dict(trained)
    merged = AutoModelForCausalLM.from_pretrained(run / "hf")
    assert isinstance(merged, LLaDA2MoeModelLM)
    ids = torch.randint(2, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, before = (m.eval()(input_ids=ids).logits for m in (peft_model, merged, base))
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    assert not torch.allclose(got, before, atol=1e-4)


def test_malformed_rows_are_counted_and_reported_not_fatal(tmp_path):
    data = tmp_path / "chat.jsonl"
    write_jsonl(make_rows(["reversal"], 12, split="train", seed=0, kind="sft"), data)
    bad = ['{"messages": [{"role": "user", "content": "hi"}', '{"messages": [{"role": "user", "content": "hi"}]}',
           '{"messages": [{"content": "no role"}, {"role": "assistant", "content": "x"}]}',
           '{"instruction": 5, "output": "x"}', '{"instruction": "say", "output": "  "}']
    lines = data.read_text().splitlines()
    for i, row in enumerate(bad):
        lines.insert(2 + 3 * i, row)
    data.write_text("\n".join(lines) + "\n")
    res = cli("sft", "--config", "configs/sft_tiny.yaml", "model.init_from=", f"run.out_dir={tmp_path / 'run'}",
              f"data.train={data}", "train.steps=2", "train.batch_size=4", "train.export_hf=false")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "12/17 rows ok, 5 skipped" in out
    for number in (3, 6, 9, 12, 15):
        assert f"{data}:{number}:" in out
    assert "invalid JSON" in out and "empty response" in out and "missing role" in out and "wrong type" in out


def test_config_and_data_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"diffusion.block_schedule\[0\].*divide data.max_len 32"):
        load_stage_config("sft", "configs/sft_tiny.yaml", ["diffusion.block_schedule=[[10, 12]]"])
    with pytest.raises(ConfigError, match=r"lora.dropout.*experts"):  # the LoRA section checks itself on load
        load_stage_config("sft", "configs/sft_tiny_lora.yaml", ["lora.dropout=0.1"])
    with pytest.raises(ConfigError, match=r"lora.rank"):
        load_stage_config("sft", "configs/sft_tiny_lora.yaml", ["lora.rank=0"])
    cfg = load_stage_config("sft", "configs/sft_tiny_lora.yaml", ["lora.target_modules=[nope]"])
    with pytest.raises(ConfigError, match=r"lora.target_modules"):
        apply_lora(LLaDA2MoeModelLM(tiny_config()), cfg.lora)
    cfg = load_stage_config("sft", "configs/sft_tiny.yaml", [f"data.train={tmp_path}/missing.jsonl"])
    with pytest.raises(ValueError, match=r"missing.jsonl"):
        load_sft_splits(cfg)
    cfg = load_stage_config("sft", "configs/sft_tiny.yaml", ["data.tasks=[nope]"])
    with pytest.raises(ConfigError, match=r"data.tasks.*nope"):
        load_sft_splits(cfg)
    cfg = load_stage_config("sft", "configs/sft_tiny.yaml", ["data.task_options={sorting: {length: 3}}"])
    with pytest.raises(ConfigError, match=r"data.task_options.*sorting"):
        load_sft_splits(cfg)


def test_task_options_shape_the_generated_rows():
    cfg = load_stage_config("sft", "configs/sft_tiny.yaml",
                            ["data.tasks=[sorting]", "data.num_train=50", "data.num_eval=10",
                             "data.task_options={sorting: {min_len: 2, max_len: 3}}"])
    train, held_out = load_sft_splits(cfg)
    assert len(train.rows) == 50 and len(held_out.rows) == 10
    assert load_sft_splits(load_stage_config("sft", "configs/sft_tiny.yaml", ["data.num_eval=0"]))[1] is None
    assert {len(r["answer"]) for r in train.rows + held_out.rows} == {2, 3}
    assert not {r["messages"][0]["content"] for r in train.rows} & {r["messages"][0]["content"] for r in held_out.rows}
