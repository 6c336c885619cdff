"""Train the project's small byte-level BPE tokenizer on the local Python standard library.

    python -m llada_train.data.train_tokenizer --out llada_train/data/tokenizer

Why a tiny vocab (4096): the embedded default model is a few million parameters; a big vocab
would put most of them in the embedding. Digits are split one per token so multi-digit
arithmetic (the SFT/RL task families) is learnable digit by digit. Special tokens sit at fixed
ids so configs and tests can rely on them:

    0 <|endoftext|>  (eos and pad)     1 <|mask|>  (the diffusion mask)
    2 <role>  3 </role>  4 <|role_end|>   (LLaDA2.0 / Ling-2.0 chat markup)

The chat template mirrors LLaDA2.0's markup: `<role>SYSTEM</role>...<|role_end|>`,
`<role>HUMAN</role>...<|role_end|>`, `<role>ASSISTANT</role>...<|role_end|>`; role names are
plain text, as in the released tokenizer. Unlike the release it adds no default system prompt
("detailed thinking off"): the tiny models never see one and it would only cost tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llada_train.data.text import stdlib_files

VOCAB_SIZE = 4096
EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
ROLE_TOKENS = ["<role>", "</role>", "<|role_end|>"]
SPECIAL_TOKENS = [EOS_TOKEN, MASK_TOKEN, *ROLE_TOKENS]  # list position == token id

# Roles map to LLaDA2's upper-case names; unknown roles are upper-cased as they are.
CHAT_TEMPLATE = (
    "{%- set names = {'system': 'SYSTEM', 'user': 'HUMAN', 'human': 'HUMAN', "
    "'assistant': 'ASSISTANT', 'tool': 'OBSERVATION'} -%}"
    "{%- for message in messages -%}"
    "{%- set role = message['role'] | lower -%}"
    "{{- '<role>' + names.get(role, role | upper) + '</role>' + message['content'] + '<|role_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<role>ASSISTANT</role>' -}}{%- endif -%}"
)


def _texts(files: list[Path]):
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="ignore")
        if text.strip():
            yield text


def train(out: Path, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train on the stdlib (test dirs skipped) and save a `PreTrainedTokenizerFast` under `out`."""
    files = stdlib_files()
    bpe = Tokenizer(models.BPE())  # no unk token: byte-level covers every input
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=True,
    )
    bpe.train_from_iterator(_texts(files), trainer=trainer, length=len(files))
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert bpe.token_to_id(tok) == i, (tok, bpe.token_to_id(tok))
    assert bpe.get_vocab_size() == vocab_size, bpe.get_vocab_size()

    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        additional_special_tokens=ROLE_TOKENS,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    tok.chat_template = CHAT_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    # chat template inside tokenizer_config.json and the generic class name: older transformers
    # releases (no chat_template.jinja, TokenizersBackend, extra_special_tokens list) load it too
    tok.save_pretrained(out, save_jinja_files=False)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["additional_special_tokens"] = config.pop("extra_special_tokens", ROLE_TOKENS)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return tok


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("llada_train/data/tokenizer"))
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    tok = train(args.out, args.vocab_size)
    print(f"saved {len(tok)}-token tokenizer to {args.out} in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
