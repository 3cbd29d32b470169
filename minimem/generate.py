"""Sampling with a KV cache, as a served model decodes: prefill the prompt once, then one token per step.

Without a cache (nanoGPT's ``generate``), every new token re-runs the whole context through every
layer. With a :class:`minimem.model.KVCache` the prompt runs once (the *prefill*), and each new
token then runs alone (T = 1), its attention reading the keys and values the cache kept. Only
attention needs a cache: the FFN, the MoE and every memory layer (PKM, PEER, UltraMem's skip
pairs, UltraMemV2) act on each token by itself. That per-token step at batch B is what the papers
time, and what ``minimem bench decode`` measures: each step reads the weights for only B tokens.

Context longer than ``block_size``: like nanoGPT, the model sees the last ``block_size`` tokens.
Once the context is longer, the cache cannot slide: the cached keys of layers >= 1 depend on the
token that left the window. So from then on each step recomputes the cropped window in full (no
cache), exactly nanoGPT's step. Either way the logits equal those of ``model(idx[:, -block_size:])``.

The model is switched to eval mode while sampling (dropout off, BatchNorm queries on their running
statistics) and put back in its former mode after.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from minimem.model import KVCache


def next_token_probabilities(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None):
    """(B, V) logits -> (B, V) probabilities: softmax(logits / temperature) over the top_k largest
    logits of each row (exactly k, even among ties), 0 elsewhere; temperature 0 puts 1 on the argmax."""
    _check_sampling(temperature, top_k)
    if temperature == 0 or top_k == 1:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # float32 at least
    if top_k is not None and top_k < logits.shape[-1]:
        values, ids = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, -math.inf).scatter(-1, ids, values)
    return F.softmax(logits, dim=-1)


@torch.no_grad()
def generate(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Append ``max_new_tokens`` sampled tokens to each prompt of ``idx`` (B, T); return (B, T + new).

    ``temperature`` 0 is greedy decoding (argmax, as is ``top_k=1``); ``top_k`` keeps the k most likely
    tokens; ``generator`` makes the draws reproducible. Uses the KV cache (module docstring).
    """
    config = model.config
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] < 1 or idx.dtype != torch.long:
        raise ValueError(f"idx must be a (B, T) int64 tensor of token ids with T >= 1, got {_describe(idx)}")
    if not 0 <= int(idx.min()) <= int(idx.max()) < config.vocab_size:
        raise ValueError(f"idx holds token ids outside [0, model.vocab_size={config.vocab_size})")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    _check_sampling(temperature, top_k)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if max_new_tokens == 0:
        return idx
    block, was_training = config.block_size, model.training
    model.eval()
    try:
        cache = KVCache(config, idx.shape[0], model.lm_head.weight.dtype, idx.device)
        logits, _ = model(idx[:, -block:], cache=cache)  # prefill
        for step in range(max_new_tokens):
            probs = next_token_probabilities(logits[:, -1], temperature, top_k)
            greedy = temperature == 0 or top_k == 1
            token = probs.argmax(-1, keepdim=True) if greedy else torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat((idx, token), dim=1)
            if step == max_new_tokens - 1:
                break
            if cache.length < block:  # one token, reading the cached keys and values
                logits, _ = model(token, cache=cache)
            else:  # the window slides: recompute it in full
                logits, _ = model(idx[:, -block:])
    finally:
        model.train(was_training)
    return idx


def _check_sampling(temperature, top_k) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")


def _describe(idx) -> str:
    if not isinstance(idx, torch.Tensor):
        return type(idx).__name__
    return f"a {idx.dtype} tensor of shape {tuple(idx.shape)}"


__all__ = ["generate", "next_token_probabilities"]
