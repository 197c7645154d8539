"""The run's tokenizer (a Hugging Face ``tokenizers`` JSON) in the forms HF and llama.cpp read.

gptscale's datasets use byte-level BPE: GPT-2's pre-tokenizer regex, bytes mapped to printable characters,
one end-of-document token appended to every document. llama.cpp implements exactly that tokenizer as
``tokenizer.ggml.model=gpt2`` with the ``gpt-2`` pre-tokenizer, so GGUF files carry the vocabulary, merges and
token types and llama.cpp tokenizes text itself. Tokenizers built differently are refused rather than
silently tokenized another way.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer

from gptscale.convert import ConversionError

EOD_NAMES = ("<|endoftext|>", "<|eod|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:
        raise ConversionError(f"{path} is not a Hugging Face tokenizers JSON file: {error}") from error


def vocab_size(tokenizer: Tokenizer) -> int:
    return tokenizer.get_vocab_size(with_added_tokens=True)


def eod_token(tokenizer: Tokenizer) -> Optional[tuple[str, int]]:
    """The end-of-document token: the only special token, or the one with a conventional EOD name."""
    special = [token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special]
    named = [name for name in EOD_NAMES if name in special]
    content = special[0] if len(special) == 1 else (named[0] if named else None)
    token_id = None if content is None else tokenizer.token_to_id(content)
    return None if content is None or token_id is None else (content, token_id)


def write_hf_tokenizer(tokenizer_file: Path, out_dir: Path, model_max_length: int) -> None:
    """tokenizer.json and tokenizer_config.json (EOD as eos, bos and pad token) for ``AutoTokenizer``.

    transformers writes the config; tokenizer.json is then the run's own file, byte for byte (transformers
    would add a post-processor template that changes nothing but the file)."""
    from transformers import PreTrainedTokenizerFast

    eod = eod_token(load_tokenizer(tokenizer_file))
    special = {} if eod is None else {"eos_token": eod[0], "bos_token": eod[0], "pad_token": eod[0]}
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        **special,
    )
    hf_tokenizer.save_pretrained(str(out_dir))
    shutil.copyfile(tokenizer_file, Path(out_dir) / "tokenizer.json")


@dataclass
class GgufVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    eod_id: Optional[int]


def _check_byte_level_bpe(spec: dict, path: Path) -> None:
    model, pre, normalizer = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"model type {model.get('type')!r} (llama.cpp's gpt2 tokenizer is BPE)")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        problems.append(f"pre-tokenizer {json.dumps(pre)} (expected ByteLevel with GPT-2's regex, no prefix space)")
    if normalizer:
        problems.append(f"normalizer {normalizer.get('type')!r} (llama.cpp's gpt2 tokenizer normalizes nothing)")
    if problems:
        raise ConversionError(f"{path}: llama.cpp cannot reproduce this tokenizer: " + "; ".join(problems))


def gguf_vocab(tokenizer_file: Path) -> GgufVocab:
    """Vocabulary, token types and merges for GGUF's ``tokenizer.ggml.*`` keys, ordered by id."""
    from gguf import TokenType

    spec = json.loads(Path(tokenizer_file).read_text())
    _check_byte_level_bpe(spec, tokenizer_file)
    tokenizer = load_tokenizer(tokenizer_file)
    added = tokenizer.get_added_tokens_decoder()
    tokens, types = [], []
    for token_id in range(vocab_size(tokenizer)):
        content = tokenizer.id_to_token(token_id)
        if content is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(TokenType.UNUSED)
        elif token_id in added:
            tokens.append(content)
            types.append(TokenType.CONTROL if added[token_id].special else TokenType.USER_DEFINED)
        else:
            tokens.append(content)
            types.append(TokenType.NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in spec["model"].get("merges", [])]
    eod = eod_token(tokenizer)
    return GgufVocab(tokens, [int(t) for t in types], merges, None if eod is None else eod[1])
