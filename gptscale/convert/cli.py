"""``gptscale-convert`` and ``gptscale-generate``: argument parsing, loading, and the closing report.

Checkpoints are read with ``gptscale.checkpoint.read.load_model_state`` (the gathered, layout-independent
weights, whatever layout saved them) and imports are written with ``save_model_state``; the reader's
``CheckpointError`` (incomplete, damaged, missing) becomes the command's error message.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Optional

import torch

from gptscale.convert import GGUF_DTYPES, K_QUANTS, ConversionError


def read_checkpoint(path: Path):
    """(config, global tensors, tokenizer file) of a gptscale checkpoint, whatever layout wrote it; ``path``
    may also be a run or checkpoints directory (its newest complete checkpoint)."""
    from gptscale.checkpoint import CheckpointError
    from gptscale.checkpoint.read import load_model_state

    try:
        return load_model_state(Path(path))
    except CheckpointError as error:
        raise ConversionError(f"cannot read checkpoint {path}: {error}") from error


def _convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptscale-convert",
        description="Convert a gptscale checkpoint to Hugging Face transformers or GGUF, or import a Hugging Face "
        "GPT-2 / Llama directory as a gptscale checkpoint.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="gptscale checkpoint directory (any layout)")
    source.add_argument("--from-hf", type=Path, metavar="DIR", help="Hugging Face model directory to import")
    parser.add_argument("--to", choices=("hf", "gguf"), help="output format (with --checkpoint)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (hf, import) or file (gguf)")
    parser.add_argument(
        "--dtype",
        default="f32",
        choices=GGUF_DTYPES,
        help="weight type of the output (q8_0 and the K-quants q4_k_m, q5_k_m, q6_k: GGUF only; "
        "K-quants need llama-cpp-python)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous output of the same kind (an HF export, a GGUF file, an imported "
        "checkpoint); never a run, a checkpoint or the source",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="with --from-hf: Hydra-style overrides such as parallel.tp=2 parallel.pp=2, checked "
        "against the model now (a layout that cannot split it is refused here, not at the "
        "first training launch) and recorded in the checkpoint's config.yaml. The weights "
        "themselves load at any layout; the gptscale-train command printed at the end "
        "continues at this one",
    )
    return parser


def _import(args) -> list[str]:
    from gptscale.checkpoint.read import save_model_state
    from gptscale.convert.from_hf import import_hf, resume_overrides
    from gptscale.convert.mapping import architecture
    from gptscale.convert.output import IMPORTED, Summary, check_output, staged

    check_output(args.out, IMPORTED, [args.from_hf], args.overwrite)
    cfg, state, tokenizer_file = import_hf(args.from_hf, args.overrides)
    with staged(args.out, IMPORTED, args.overwrite, make_dir=False) as stage:
        save_model_state(stage, cfg, state, tokenizer_file)
    files = sorted(path for path in Path(args.out).rglob("*") if path.is_file())
    summary = Summary(
        "gptscale checkpoint",
        architecture(cfg.model),
        sum(t.numel() for t in state.values()),
        "f32",
        Path(args.out),
        files,
    )
    out = Path(args.out).resolve()
    command = ["gptscale-train", f"checkpoint.resume={out}", *resume_overrides(cfg, args.overrides)]
    data = "data whose tokenizer has the model's vocabulary"
    if tokenizer_file is not None:
        data = f"data tokenized with its tokenizer.json (gptscale-prepare --tokenizer {shlex.quote(str(out))})"
    return summary.lines() + [
        f"weights only, loadable at any layout; this one was checked: tp={cfg.parallel.tp} pp={cfg.parallel.pp}",
        f"continue training on {data} with:",
        "  " + shlex.join(command),
    ]


def convert(argv: Optional[list[str]] = None) -> list[str]:
    """Run one conversion; returns the summary lines."""
    args = _convert_parser().parse_args(argv)
    if args.from_hf is not None:
        if args.to is not None:
            raise ConversionError("--to is for --checkpoint; --from-hf always writes a gptscale checkpoint")
        return _import(args)
    if args.to is None:
        raise ConversionError("--checkpoint needs --to hf or --to gguf")
    if args.overrides:
        raise ConversionError(f"overrides {args.overrides} are only for --from-hf")
    from gptscale.checkpoint.publish import resolve
    from gptscale.convert.output import GGUF_FILE, HF_EXPORT, check_output

    read = resolve(str(args.checkpoint), args.checkpoint)  # a run or checkpoints directory: its newest checkpoint
    check_output(
        args.out,
        HF_EXPORT if args.to == "hf" else GGUF_FILE,
        [args.checkpoint] + ([read] if read is not None else []),
        args.overwrite,
    )
    if args.to == "gguf" and args.dtype in K_QUANTS:
        from gptscale.convert.gguf import llama_quantizer

        llama_quantizer(args.dtype)  # before the conversion: says at once when llama.cpp is missing
    cfg, state, tokenizer_file = read_checkpoint(args.checkpoint)
    if args.to == "hf":
        from gptscale.convert.hf import export_hf

        summary = export_hf(cfg, state, tokenizer_file, args.out, args.dtype, args.overwrite)
    else:
        from gptscale.convert.gguf import export_gguf

        summary = export_gguf(cfg, state, tokenizer_file, args.out, args.dtype, args.overwrite)
    return summary.lines()


def convert_main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("gptscale").setLevel(logging.INFO)  # ours; megatron-core's import notices stay quiet
    try:
        lines = convert(argv)
    except ConversionError as error:
        print(f"gptscale-convert: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def _generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptscale-generate", description="Continue a prompt with a gptscale checkpoint."
    )
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--greedy", action="store_true", help="always the most likely token (the default without --temperature)"
    )
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="sample among the most likely tokens whose probabilities sum to p"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--ids", action="store_true", help="also print the generated token ids")
    return parser


def generate_text(args: argparse.Namespace) -> tuple[list[int], str]:
    """(generated token ids, their text) for parsed ``gptscale-generate`` arguments."""
    from gptscale.convert.generate import Decoder, Sampling, generate
    from gptscale.convert.tokenizer import eod_token, load_tokenizer, vocab_size

    if args.greedy and args.temperature is not None:
        raise ConversionError("--greedy and --temperature exclude each other")
    if args.temperature is not None and args.temperature <= 0:
        raise ConversionError("--temperature must be positive (use --greedy for argmax decoding)")
    cfg, state, tokenizer_file = read_checkpoint(args.checkpoint)
    if tokenizer_file is None:
        raise ConversionError(f"checkpoint {args.checkpoint} has no tokenizer.json to encode the prompt with")
    tokenizer = load_tokenizer(tokenizer_file)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    decoder = Decoder(cfg.model, state, vocab_size(tokenizer), device)
    eod = eod_token(tokenizer)
    sampling = Sampling() if args.temperature is None else Sampling(args.temperature, args.top_k, args.top_p)
    try:
        ids = generate(
            decoder,
            tokenizer.encode(args.prompt).ids,
            args.max_new_tokens,
            sampling,
            args.seed,
            stop=None if eod is None else eod[1],
        )
    except ValueError as error:
        raise ConversionError(str(error)) from error
    return ids, tokenizer.decode(ids, skip_special_tokens=True)


def generate_main(argv: Optional[list[str]] = None) -> int:
    args = _generate_parser().parse_args(argv)
    try:
        ids, text = generate_text(args)
    except ConversionError as error:
        print(f"gptscale-generate: error: {error}", file=sys.stderr)
        return 2
    print(text)
    if args.ids:
        print("ids:", " ".join(map(str, ids)))
    return 0
