"""Tokenizers for preparation: a Hugging Face ``tokenizers`` file, or a byte-level BPE trained on the input.

Training needs no download and is deterministic (same texts, same vocabulary size: same JSON), which the
embedded default job relies on to cache its dataset by content.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gptscale.data.manifest import DataError

DEFAULT_EOD = "<|endoftext|>"
EOD_CANDIDATES = (DEFAULT_EOD, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|eot_id|>")


@dataclass
class TokenizerInfo:
    tokenizer: Tokenizer
    json: str  # the serialised tokenizer, copied next to the manifest
    eod_token: str
    eod: int
    source: str  # where it came from, for the manifest

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def load_tokenizer(path: str | Path, eod_token: Optional[str] = None) -> TokenizerInfo:
    """A ``tokenizer.json`` file, or a directory holding one (as Hugging Face model repositories do)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"--tokenizer {path}: no tokenizer.json there")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises plain Exceptions for malformed files
        raise DataError(f"--tokenizer {file}: not a Hugging Face tokenizers file ({error})") from error
    candidates = (eod_token,) if eod_token else EOD_CANDIDATES
    for token in candidates:
        eod = tokenizer.token_to_id(token)
        if eod is not None:
            return TokenizerInfo(tokenizer, file.read_bytes().decode("utf-8"), token, eod, str(path))
    raise DataError(
        f"--tokenizer {file} has no end-of-document token among {list(candidates)}; name one with --eod-token"
    )


def train_bpe(texts: Iterable[str], vocab_size: int, eod_token: Optional[str] = None) -> TokenizerInfo:
    """A GPT-2 style byte-level BPE of ``vocab_size`` tokens (the 256 bytes and ``eod_token`` included)."""
    eod_token = eod_token or DEFAULT_EOD
    if vocab_size < 258:
        raise DataError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least 258 (256 bytes + end of document)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eod_token],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    eod = tokenizer.token_to_id(eod_token)
    assert eod is not None, "the trainer was given the end-of-document token as a special token"
    return TokenizerInfo(
        tokenizer, tokenizer.to_str(), eod_token, eod, f"byte-level BPE of {vocab_size} trained on the input"
    )
