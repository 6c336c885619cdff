"""Load a tokenizer and make sure it has what a masked-diffusion LM needs: a mask token (the
noising target) and an eos token (document separator, and the pad token when none is set)."""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..presets import TOKENIZER_DIR

DEFAULT_TOKENIZER = TOKENIZER_DIR  # shipped inside the package: llada_train/data/tokenizer
MASK_TOKEN = "<|mask|>"


def load_tokenizer(path_or_name: str | None = None) -> PreTrainedTokenizerFast:
    """The project tokenizer (None or "default"), a local directory, or a Hugging Face name."""
    if path_or_name in (None, "default"):
        if not (DEFAULT_TOKENIZER / "tokenizer.json").exists():
            raise ValueError(f"the default tokenizer is missing from {DEFAULT_TOKENIZER}; recreate it with "
                             f"`python -m llada_train.data.train_tokenizer --out {DEFAULT_TOKENIZER}`")
        path_or_name = str(DEFAULT_TOKENIZER)
    from ..errors import UserError  # the tokenizer the user named (model.tokenizer, --tokenizer, a model dir)

    try:
        tok = AutoTokenizer.from_pretrained(path_or_name)
    except (OSError, ValueError) as e:  # transformers' word on those files
        raise UserError(f"could not load tokenizer {path_or_name!r} (a local directory with "
                        f"tokenizer.json, a Hugging Face name, or 'default'): {e}") from e
    if not tok.is_fast:
        raise UserError(f"tokenizer {path_or_name!r} is a slow {type(tok).__name__}; a fast "
                        f"(tokenizers-backed) tokenizer with a tokenizer.json is required")
    if tok.mask_token is None:
        if MASK_TOKEN not in tok.get_vocab():
            raise UserError(f"tokenizer {path_or_name!r} has no mask token and no {MASK_TOKEN!r} in its "
                            f"vocabulary; masked diffusion needs one: add it as a special token")
        tok.mask_token = MASK_TOKEN
    if tok.eos_token is None:
        raise UserError(f"tokenizer {path_or_name!r} has no eos token; set `eos_token` in its "
                        f"tokenizer_config.json (documents are separated and padded with it)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def special_token_ids(tok: PreTrainedTokenizerFast) -> set[int]:
    """Ids of all special tokens (eos, pad, mask, role markers...): never noise targets for T2T
    random replacement, never counted as content."""
    ids = set(tok.all_special_ids)
    ids.update(i for i, t in tok.added_tokens_decoder.items() if t.special)
    return ids
