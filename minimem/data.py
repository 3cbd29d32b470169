"""Data: tiny Shakespeare (characters) and three synthetic memory tasks.

Every dataset answers ``get_batch(split, batch_size, generator) -> (x, y)``: int64 tensors of
shape (B, block_size), ``y`` the next tokens, ``-1`` wherever no loss is taken.

- ``"shakespeare"``: nanoGPT's character-level tiny Shakespeare (65 symbols); first 90% of the
  text is the train split, the last 10% the val split; random windows, no masking.
- ``"facts"`` (capacity): F random key -> value facts fixed by the seed. Sequences list
  ``key:value,`` items for random facts; the loss is on the value tokens only, so the model can
  only lower it by storing the table in its weights. Both splits use the same table.
- ``"recall"`` (in-context associative recall, Zoology's MQAR): ``k:v,`` pairs, ``|``, then
  queries ``k:v,`` of some of those keys; loss on the queried values.
- ``"multiround"`` (multi-round memorisation, the long-context task of [UM2] §5): facts stated
  first, then rounds of distractor text followed by ``|`` and queries of the facts.

The synthetic tasks share one symbolic vocabulary (``SYMBOLS``): keys are lowercase letters,
values digits, distractors uppercase letters, so a distractor can never look like a fact.
Their ``evaluate(model)`` scores exact match: an answer counts only if the teacher-forced
greedy argmax is right on every one of its tokens (one forward per batch, no sampling loop).
For "recall" and "multiround" the train split is fresh random episodes drawn from the caller's
generator, the val split a fixed pool of ``n_val`` episodes drawn from a seed of its own.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import string
from typing import Optional, Sequence, Union

import torch

DATASETS = ("shakespeare", "facts", "recall", "multiround")
SPLITS = ("train", "val")

PAD, SEP, COMMA, QUERY = ".", ":", ",", "|"
KEY_SYMBOLS = string.ascii_lowercase  # keys: up to 26 symbols
VALUE_SYMBOLS = string.digits  # values: up to 10 symbols
DISTRACTOR_SYMBOLS = string.ascii_uppercase  # distractor text (multiround)
SYMBOLS = PAD + SEP + COMMA + QUERY + KEY_SYMBOLS + VALUE_SYMBOLS + DISTRACTOR_SYMBOLS


class CharTokenizer:
    """One token per character; ids follow the order of ``chars``."""

    def __init__(self, chars: Union[str, Sequence[str]]):
        chars = list(chars)
        if not chars or any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("chars must be a non-empty sequence of single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("chars must not contain duplicates")
        self.chars = "".join(chars)
        self.vocab_size = len(chars)
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The sorted set of characters of ``text`` (nanoGPT's tokenizer)."""
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the tokenizer's vocabulary") from None

    def decode(self, ids: Union[Sequence[int], torch.Tensor]) -> str:
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise ValueError(f"decode expects a 1-D sequence of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {bad[0]}")
        return "".join(self.chars[i] for i in ids)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


SYMBOL_TOKENIZER = CharTokenizer(SYMBOLS)
_PAD_ID, _SEP_ID, _COMMA_ID, _QUERY_ID = (SYMBOL_TOKENIZER.stoi[c] for c in (PAD, SEP, COMMA, QUERY))
_KEY0, _VALUE0, _DISTRACTOR0 = (SYMBOL_TOKENIZER.stoi[s[0]] for s in (KEY_SYMBOLS, VALUE_SYMBOLS, DISTRACTOR_SYMBOLS))


@functools.lru_cache(maxsize=1)
def load_shakespeare() -> str:
    """The tiny Shakespeare text (1,115,394 characters) shipped in ``minimem/assets``."""
    return importlib.resources.files("minimem").joinpath("assets/tinyshakespeare.txt").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _shakespeare_tokens() -> tuple[CharTokenizer, torch.Tensor]:
    text = load_shakespeare()
    tok = CharTokenizer.from_text(text)
    return tok, torch.tensor(tok.encode(text), dtype=torch.long)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


class Dataset:
    """Base class: ``name``, ``vocab_size``, ``tokenizer``, ``block_size`` and ``get_batch``."""

    name: str = ""
    has_exact_match: bool = False  # True for the synthetic tasks (they define evaluate)

    def __init__(self, tokenizer: CharTokenizer, block_size: int, seed: int):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.block_size = block_size
        self.seed = seed

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self, model, n: Optional[int] = None, generator: Optional[torch.Generator] = None, **kwargs) -> dict:
        raise NotImplementedError(f"dataset {self.name!r} has no exact-match metric (use the validation loss)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, block_size={self.block_size})"


class ShakespeareDataset(Dataset):
    """Character-level tiny Shakespeare; train = first 90% of the tokens, val = the last 10%."""

    name = "shakespeare"
    train_fraction = 0.9

    def __init__(self, block_size: int, seed: int = 0):
        tokenizer, data = _shakespeare_tokens()
        super().__init__(tokenizer, block_size, seed)
        n_train = int(self.train_fraction * len(data))
        self.data = {"train": data[:n_train], "val": data[n_train:]}
        shortest = min(len(d) for d in self.data.values())
        if block_size >= shortest:
            raise ValueError(f"block_size must be < {shortest} (the val split's length), got {block_size}")
        self._offsets = torch.arange(block_size + 1)

    def get_batch(self, split, batch_size, generator):
        _check_split(split)
        _check_batch_size(batch_size)
        data = self.data[split]
        start = torch.randint(len(data) - self.block_size, (batch_size, 1), generator=generator)
        chunk = data[start + self._offsets]  # (B, block_size + 1), one gather
        return chunk[:, :-1], chunk[:, 1:]


# ----------------------------------------------------------------------------- synthetic tasks


class SyntheticDataset(Dataset):
    """Shared machinery: ``key:value,`` items, answer layout, loss mask and exact match.

    Every sequence of a task has the same layout, so the answer positions are one constant
    tensor ``answer_positions`` (n_answers, value_len) of indices into ``y``'s time axis.
    """

    has_exact_match = True
    _defaults: dict = {}

    def __init__(self, block_size: int, seed: int, kwargs: dict):
        super().__init__(SYMBOL_TOKENIZER, block_size, seed)
        unknown = sorted(set(kwargs) - set(self._defaults))
        if unknown:
            raise ValueError(
                f"unknown argument(s) {unknown} for dataset {self.name!r}; allowed: {sorted(self._defaults)}"
            )
        args = {**self._defaults, **kwargs}
        for key, value in args.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{key} must be an integer, got {value!r}")
        self.args = args
        self.key_len, self.value_len = args["key_len"], args["value_len"]
        self.key_vocab, self.value_vocab = args["key_vocab"], args["value_vocab"]
        _check_range("key_len", self.key_len, 1, None)
        _check_range("value_len", self.value_len, 1, None)
        _check_range("key_vocab", self.key_vocab, 1, len(KEY_SYMBOLS))
        _check_range("value_vocab", self.value_vocab, 2, len(VALUE_SYMBOLS))
        self.n_keys = self.key_vocab**self.key_len  # distinct keys available
        self.item_len = self.key_len + 1 + self.value_len + 1  # "key:value,"

    # ------------------------------------------------------------- building blocks
    def _check_length(self, length: int, names: str) -> None:
        if length > self.block_size + 1:
            raise ValueError(
                f"a {self.name!r} sequence needs {length} tokens but block_size + 1 = {self.block_size + 1}: "
                f"reduce {names} or raise block_size"
            )

    def _key_tokens(self, keys: torch.Tensor) -> torch.Tensor:
        """Key ids in [0, key_vocab^key_len) -> (..., key_len) lowercase token ids (base key_vocab digits)."""
        powers = self.key_vocab ** torch.arange(self.key_len - 1, -1, -1)
        return _KEY0 + (keys.unsqueeze(-1) // powers) % self.key_vocab

    def _items(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """(..., key_len) ids of keys and (..., value_len) digit indices -> (..., n * item_len) tokens."""
        shape = keys.shape
        sep = torch.full(shape + (1,), _SEP_ID, dtype=torch.long)
        comma = torch.full(shape + (1,), _COMMA_ID, dtype=torch.long)
        items = torch.cat([self._key_tokens(keys), sep, _VALUE0 + values, comma], dim=-1)
        return items.flatten(-2)

    def _item_answers(self, start: int, n_items: int) -> list[list[int]]:
        """y positions of the value tokens of ``n_items`` items laid out from sequence index ``start``."""
        out = []
        for k in range(n_items):
            first = start + k * self.item_len + self.key_len  # y index predicting the first value token
            out.append(list(range(first, first + self.value_len)))
        return out

    def _finish(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L <= block_size + 1) tokens -> padded x and answer-masked y."""
        B, L = seq.shape
        full = torch.full((B, self.block_size + 1), _PAD_ID, dtype=torch.long)
        full[:, :L] = seq
        x, target = full[:, :-1], full[:, 1:]
        y = torch.full_like(target, -1)
        pos = self.answer_positions.flatten()
        y[:, pos] = target[:, pos]
        return x, y

    def _sample(self, split: str, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def get_batch(self, split, batch_size, generator):
        _check_split(split)
        _check_batch_size(batch_size)
        return self._finish(self._sample(split, batch_size, generator))

    # ------------------------------------------------------------- exact match
    def _eval_sequences(self, n: Optional[int], generator, split) -> tuple[torch.Tensor, int]:
        """(sequences, number of answers to score, counted in row-major order)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(
        self,
        model,
        n: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        split: str = "val",
        batch_size: int = 64,
    ) -> dict:
        """Exact match of teacher-forced greedy argmax on the answers.

        ``model(x)`` may return logits (B, T, V) or a ``(logits, loss)`` tuple. Returns
        ``dict(exact_match, token_accuracy, n)`` with ``n`` the number of answers scored.
        """
        _check_split(split)
        _check_batch_size(batch_size)
        seqs, n_answers = self._eval_sequences(n, generator, split)
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        params = list(model.parameters()) if hasattr(model, "parameters") else []
        device = params[0].device if params else torch.device("cpu")
        pos = self.answer_positions  # (A, value_len)
        answer_ok, token_ok = [], []
        try:
            for i in range(0, len(seqs), batch_size):
                x, y = self._finish(seqs[i : i + batch_size])
                out = model(x.to(device))
                logits = out[0] if isinstance(out, (tuple, list)) else out
                hit = (logits.argmax(-1).cpu() == y)[:, pos]  # (B, A, value_len)
                answer_ok.append(hit.all(-1).flatten())
                token_ok.append(hit.flatten(1))
        finally:
            if hasattr(model, "train"):
                model.train(was_training)
        answer_ok = torch.cat(answer_ok)[:n_answers]
        token_ok = torch.cat(token_ok).reshape(-1, self.value_len)[:n_answers]
        return dict(
            exact_match=answer_ok.float().mean().item(),
            token_accuracy=token_ok.float().mean().item(),
            n=n_answers,
        )

    def _val_pool(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(_split_seed(self.seed, "val"))
        return self._draw(self.args["n_val"], g)

    def _draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def _episodes(self, split, batch_size, generator):
        if split == "train":
            return self._draw(batch_size, generator)
        rows = torch.randint(len(self.val_pool), (batch_size,), generator=generator)
        return self.val_pool[rows]

    def _eval_episodes(self, n, generator, split):
        n = 256 if n is None else n
        if split == "val":
            _check_range("n", n, 1, len(self.val_pool))
            rows = torch.arange(n) if generator is None else torch.randperm(len(self.val_pool), generator=generator)[:n]
            seqs = self.val_pool[rows]
        else:
            _check_range("n", n, 1, None)
            g = generator if generator is not None else torch.Generator().manual_seed(_split_seed(self.seed, "train"))
            seqs = self._draw(n, g)
        return seqs, n * len(self.answer_positions)


def _check_range(name: str, value: int, low: int, high: Optional[int]) -> None:
    if value < low or (high is not None and value > high):
        allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {allowed}, got {value}")


def _split_seed(seed: int, split: str) -> int:
    return seed * 1_000_003 + (17 if split == "val" else 29)


def _distinct(batch: int, population: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, k) distinct integers from [0, population) per row, uniformly without replacement."""
    return torch.multinomial(torch.ones(batch, population), k, replacement=False, generator=generator)


class FactsDataset(SyntheticDataset):
    """Capacity: memorise ``n_facts`` random key -> value facts (the table is fixed by the seed)."""

    name = "facts"
    _defaults = dict(n_facts=256, key_len=2, value_len=2, key_vocab=26, value_vocab=10)

    def __init__(self, block_size: int, seed: int = 0, **kwargs):
        super().__init__(block_size, seed, kwargs)
        self.n_facts = self.args["n_facts"]
        _check_range("n_facts", self.n_facts, 1, self.n_keys)  # keys must be distinct
        self.items_per_seq = (block_size + 1) // self.item_len
        if self.items_per_seq < 1:
            self._check_length(self.item_len, "key_len/value_len")
        g = torch.Generator().manual_seed(seed)
        self.keys = torch.randperm(self.n_keys, generator=g)[: self.n_facts]  # (F,)
        self.values = torch.randint(self.value_vocab, (self.n_facts, self.value_len), generator=g)
        self.answer_positions = torch.tensor(self._item_answers(0, self.items_per_seq))

    def _rows(self, facts: torch.Tensor) -> torch.Tensor:
        return self._items(self.keys[facts], self.values[facts])

    def _sample(self, split, batch_size, generator):
        # Both splits query the same table: the task is to memorise it.
        k = self.items_per_seq
        if k <= self.n_facts:
            facts = _distinct(batch_size, self.n_facts, k, generator)
        else:
            facts = torch.randint(self.n_facts, (batch_size, k), generator=generator)
        return self._rows(facts)

    def _eval_sequences(self, n, generator, split):
        """Every fact once (or ``n`` of them), packed ``items_per_seq`` per sequence."""
        n = self.n_facts if n is None else n
        _check_range("n", n, 1, self.n_facts)
        order = torch.arange(self.n_facts) if generator is None else torch.randperm(self.n_facts, generator=generator)
        order = order[:n]
        rows = math.ceil(n / self.items_per_seq)
        facts = order[torch.arange(rows * self.items_per_seq) % n].view(rows, self.items_per_seq)
        return self._rows(facts), n

    def table(self) -> list[tuple[str, str]]:
        """The facts as ``(key, value)`` strings."""
        keys = self._key_tokens(self.keys)
        return [(SYMBOL_TOKENIZER.decode(k), SYMBOL_TOKENIZER.decode(_VALUE0 + v)) for k, v in zip(keys, self.values)]


class RecallDataset(SyntheticDataset):
    """Multi-query associative recall (MQAR): ``n_pairs`` pairs, ``|``, ``n_queries`` queries."""

    name = "recall"
    _defaults = dict(n_pairs=8, n_queries=4, key_len=1, value_len=1, key_vocab=26, value_vocab=10, n_val=1024)

    def __init__(self, block_size: int, seed: int = 0, **kwargs):
        super().__init__(block_size, seed, kwargs)
        self.n_pairs, self.n_queries = self.args["n_pairs"], self.args["n_queries"]
        _check_range("n_pairs", self.n_pairs, 1, self.n_keys)
        _check_range("n_queries", self.n_queries, 1, self.n_pairs)
        _check_range("n_val", self.args["n_val"], 1, None)
        context = self.n_pairs * self.item_len + 1
        self._check_length(context + self.n_queries * self.item_len, "n_pairs/n_queries/key_len/value_len")
        self.answer_positions = torch.tensor(self._item_answers(context, self.n_queries))
        self.val_pool = self._val_pool()

    def _draw(self, batch_size, generator):
        keys = _distinct(batch_size, self.n_keys, self.n_pairs, generator)  # (B, P)
        values = torch.randint(self.value_vocab, (batch_size, self.n_pairs, self.value_len), generator=generator)
        asked = _distinct(batch_size, self.n_pairs, self.n_queries, generator)  # (B, Q)
        q_keys = keys.gather(1, asked)
        q_values = values.gather(1, asked.unsqueeze(-1).expand(-1, -1, self.value_len))
        bar = torch.full((batch_size, 1), _QUERY_ID, dtype=torch.long)
        return torch.cat([self._items(keys, values), bar, self._items(q_keys, q_values)], dim=1)

    def _sample(self, split, batch_size, generator):
        return self._episodes(split, batch_size, generator)

    def _eval_sequences(self, n, generator, split):
        return self._eval_episodes(n, generator, split)


class MultiRoundDataset(SyntheticDataset):
    """Multi-round memorisation: ``n_facts`` facts, then ``n_rounds`` x (distractor, ``|``, queries)."""

    name = "multiround"
    _defaults = dict(
        n_facts=4,
        distractor_len=12,
        n_rounds=2,
        n_queries=2,
        key_len=1,
        value_len=1,
        key_vocab=26,
        value_vocab=10,
        n_val=1024,
    )

    def __init__(self, block_size: int, seed: int = 0, **kwargs):
        super().__init__(block_size, seed, kwargs)
        a = self.args
        self.n_facts, self.distractor_len = a["n_facts"], a["distractor_len"]
        self.n_rounds, self.n_queries = a["n_rounds"], a["n_queries"]
        _check_range("n_facts", self.n_facts, 1, self.n_keys)
        _check_range("distractor_len", self.distractor_len, 0, None)
        _check_range("n_rounds", self.n_rounds, 1, None)
        _check_range("n_queries", self.n_queries, 1, self.n_facts)
        _check_range("n_val", a["n_val"], 1, None)
        facts_len = self.n_facts * self.item_len
        round_len = self.distractor_len + 1 + self.n_queries * self.item_len
        self._check_length(facts_len + self.n_rounds * round_len, "n_facts/distractor_len/n_rounds/n_queries")
        answers = []
        for r in range(self.n_rounds):
            answers += self._item_answers(facts_len + r * round_len + self.distractor_len + 1, self.n_queries)
        self.answer_positions = torch.tensor(answers)
        self.val_pool = self._val_pool()

    def _draw(self, batch_size, generator):
        B = batch_size
        keys = _distinct(B, self.n_keys, self.n_facts, generator)
        values = torch.randint(self.value_vocab, (B, self.n_facts, self.value_len), generator=generator)
        parts = [self._items(keys, values)]
        bar = torch.full((B, 1), _QUERY_ID, dtype=torch.long)
        for _ in range(self.n_rounds):
            parts.append(
                _DISTRACTOR0 + torch.randint(len(DISTRACTOR_SYMBOLS), (B, self.distractor_len), generator=generator)
            )
            parts.append(bar)
            asked = _distinct(B, self.n_facts, self.n_queries, generator)
            q_values = values.gather(1, asked.unsqueeze(-1).expand(-1, -1, self.value_len))
            parts.append(self._items(keys.gather(1, asked), q_values))
        return torch.cat(parts, dim=1)

    def _sample(self, split, batch_size, generator):
        return self._episodes(split, batch_size, generator)

    def _eval_sequences(self, n, generator, split):
        return self._eval_episodes(n, generator, split)


_CLASSES = {
    "shakespeare": ShakespeareDataset,
    "facts": FactsDataset,
    "recall": RecallDataset,
    "multiround": MultiRoundDataset,
}


def get_dataset(name: str, block_size: int, seed: int = 0, **kwargs) -> Dataset:
    """Build dataset ``name`` (one of ``DATASETS``); ``kwargs`` are the task's own arguments."""
    if name not in _CLASSES:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if name == "shakespeare" and kwargs:
        raise ValueError(f"dataset 'shakespeare' takes no extra arguments, got {sorted(kwargs)}")
    return _CLASSES[name](block_size, seed, **kwargs)
