"""``minimem generate``: sample text from the latest checkpoint of a run folder.

    minimem generate --run runs/shakespeare-dense [--prompt TEXT] [--tokens 200]
                     [--temperature 1.0] [--top-k K] [--seed 1337]

Loads the checkpoint ``RUN/checkpoint.json`` names (:func:`minimem.checkpoint.load_checkpoint`), encodes
the prompt with the run's dataset's tokenizer (:mod:`minimem.data`), samples with the KV cache
(:func:`minimem.generate.generate`) on the CPU and prints the prompt followed by the sample.
``--temperature 0`` is greedy decoding. A missing run, a run without a checkpoint, a prompt
character outside the vocabulary or a bad number exits 2 with one line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from minimem_tools.cli import ArgumentParser, usage_error


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="minimem generate", description="Sample text from a trained run.")
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="run folder written by minimem train")
    parser.add_argument("--prompt", help="text to continue (default: a newline, or the vocabulary's first symbol)")
    parser.add_argument("--tokens", type=int, default=200, help="tokens to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0: greedy (default 1)")
    parser.add_argument("--top-k", type=int, help="sample among the K most likely tokens only")
    parser.add_argument("--seed", type=int, default=1337, help="random seed of the sampling (default 1337)")
    return parser


def check_numbers(args) -> Optional[str]:
    """The first bad number as a message naming its flag, or None."""
    if args.tokens < 0:
        return f"--tokens must be >= 0, got {args.tokens}"
    if not math.isfinite(args.temperature) or args.temperature < 0:
        return f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}"
    if args.top_k is not None and args.top_k < 1:
        return f"--top-k must be >= 1, got {args.top_k}"
    if not 0 <= args.seed < 2**63:
        return f"--seed must be in [0, 2^63), got {args.seed}"
    return None


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (problem := check_numbers(args)) is not None:
        return usage_error(parser.prog, problem)
    from minimem.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, restore
    from minimem.data import get_dataset
    from minimem.model import GPT

    run = Path(args.run)
    if not run.is_dir():
        return usage_error(
            parser.prog, f"--run {run}: no such folder; give a run folder that minimem train wrote (train.out_dir)"
        )
    try:
        if latest_checkpoint(run) is None and not (run / "state.json").is_file():
            return usage_error(
                parser.prog,
                f"--run {run} holds no checkpoint (no checkpoint.json); train it first: "
                f"minimem train --config CONFIG --out {run}",
            )
        checkpoint = load_checkpoint(run)
        model = GPT(checkpoint.config.model)
        restore(checkpoint, model, rng=False)
    except CheckpointError as err:
        return usage_error(parser.prog, f"--run {run}: {err}")
    model.eval()
    data = checkpoint.config.train
    try:
        tokenizer = get_dataset(data.dataset, model.config.block_size, data.seed, **data.dataset_args).tokenizer
    except ValueError as err:
        return usage_error(parser.prog, f"--run {run}: cannot rebuild the tokenizer of dataset {data.dataset!r}: {err}")
    if tokenizer.vocab_size != model.config.vocab_size:
        return usage_error(
            parser.prog,
            f"--run {run}: the model has {model.config.vocab_size} tokens but dataset {data.dataset!r} "
            f"has {tokenizer.vocab_size}; the run folder does not match its dataset",
        )
    prompt = args.prompt if args.prompt is not None else ("\n" if "\n" in tokenizer.stoi else tokenizer.chars[0])
    if not prompt:
        return usage_error(parser.prog, "--prompt must not be empty; give at least one character, or leave it out")
    unknown = sorted({c for c in prompt if c not in tokenizer.stoi})
    if unknown:
        return usage_error(
            parser.prog,
            f"--prompt holds {', '.join(map(repr, unknown))}, not in the vocabulary of dataset {data.dataset!r} "
            f"({tokenizer.vocab_size} symbols: {tokenizer.chars!r})",
        )
    from minimem.generate import generate

    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    out = generate(
        model,
        idx,
        args.tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        generator=torch.Generator().manual_seed(args.seed),
    )
    print(tokenizer.decode(out[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
