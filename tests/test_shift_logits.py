"""`shift_logits`: position i's logits predict token i from the hidden state before it (models converted
from an AR source keep their head's meaning). References: transformers' own greedy decoding of the AR
source, and a brute-force per-block forward of the decoding layout."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llada_train.convert import convert_checkpoint
from llada_train.decoding import generate
from llada_train.diffusion import NoisedBatch, model_inputs
from llada_train.model import LLaDA2MoeModelLM
from llada_train.model.masks import block_causal_mask

from .conftest import tiny_config
from .test_convert import N_TOKENS, SMALL, save_tokenizer


@pytest.fixture(scope="module")
def llama_source(tmp_path_factory):
    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(vocab_size=N_TOKENS, rope_theta=5000.0, **SMALL)).eval()
    with torch.no_grad():
        source.lm_head.weight.mul_(8)  # peaked next-token distributions: greedy paths are not near-ties
    src = tmp_path_factory.mktemp("src")
    source.save_pretrained(src)
    save_tokenizer(src)
    return source, src


def _converted(llama_source, tmp_path, shift: bool) -> LLaDA2MoeModelLM:
    dst = convert_checkpoint(str(llama_source[1]), str(tmp_path / f"shift_{shift}"), shift_logits=shift)
    model = LLaDA2MoeModelLM.from_pretrained(dst).eval()
    assert model.config.shift_logits is shift
    return model


def test_blocks_of_one_decode_exactly_as_the_ar_source(llama_source, tmp_path):
    """Blocks of one token with the shift are AR decoding: every token comes from the previous token's
    hidden state under a causal mask, so the converted model reproduces the source's greedy tokens.
    Unshifted, the same weights do not. (The cache's hidden state for a block's later forwards is
    checked in test_decoding.py.)"""
    source = llama_source[0]
    eos, gen_length = 1, 12
    prompts = [torch.randint(3, N_TOKENS, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9)]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), eos)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = p
    plen = torch.tensor([len(p) for p in prompts])
    got = {}
    for shift in (True, False):
        model = _converted(llama_source, tmp_path, shift)
        with torch.no_grad():
            out = generate(model, ids, gen_length=gen_length, block_length=1, threshold=0.9, eos_token_id=eos,
                           mask_token_id=model.config.mask_token_id, prompt_lengths=plen)
        got[shift] = [out.sequences[r, width:].tolist() for r in range(len(prompts))]
    for r, prompt in enumerate(prompts):
        with torch.no_grad():
            want = source.generate(prompt[None], max_new_tokens=gen_length, do_sample=False, eos_token_id=eos,
                                   pad_token_id=eos)[0, len(prompt):].tolist()
        want += [eos] * (gen_length - len(want))
        assert got[True][r] == want
        assert got[False][r] != want


def test_training_layout_reads_what_decoding_reads():
    """[x_t ; x_0] with the shift: block k's noisy positions get the logits a decoding forward over the
    clean blocks before k and the noisy block k gives (block-causal mask, one block at a time); a block's
    first position reads the clean token before it, which the assert on position 0 of each block checks."""
    torch.manual_seed(0)
    model = LLaDA2MoeModelLM(tiny_config(shift_logits=True)).eval()
    bsz, seq_len, block = 2, 24, 8
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randint(5, model.config.vocab_size - 1, (bsz, seq_len), generator=gen)
    masked = torch.rand(bsz, seq_len, generator=gen) < 0.5
    xt = torch.where(masked, torch.full_like(x0, model.config.mask_token_id), x0)
    ones = torch.ones_like(masked)
    batch = NoisedBatch(x0, xt, ones, masked, ones.float(), torch.zeros_like(masked),
                        torch.zeros_like(x0), ones)
    with torch.no_grad():
        logits = model(**model_inputs(batch, block)).logits[:, :seq_len].double()  # (B, L, V) the noisy half
        for k in range(seq_len // block):
            lo, hi = k * block, (k + 1) * block
            ids = torch.cat([x0[:, :lo], xt[:, lo:hi]], 1)  # (B, hi)
            want = model(ids, attention_mask=block_causal_mask(hi, block),
                         position_ids=torch.arange(hi)[None].expand(bsz, -1)).logits[:, lo:hi].double()
            torch.testing.assert_close(logits[:, lo:hi], want, atol=1e-5, rtol=1e-5)
        # The shift changes what each position reads: unshifted, the same weights give other logits.
        model.config.shift_logits = False
        unshifted = model(**model_inputs(batch, block)).logits[:, :seq_len].double()
    assert (unshifted - logits).abs().amax() > 1e-2
