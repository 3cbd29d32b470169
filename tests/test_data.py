"""minimem.data: tokenizer, Shakespeare split and windows, synthetic tasks, exact match."""

import pytest
import torch

from minimem.data import (
    DATASETS,
    SYMBOLS,
    CharTokenizer,
    get_dataset,
    load_shakespeare,
)

SYNTHETIC = ("facts", "recall", "multiround")
UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_vocabulary():
    text = load_shakespeare()
    assert len(text) == 1115394
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 65 and tok.chars == "".join(sorted(set(text)))
    sample = text[1000:3000]
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert tok.decode(torch.tensor(ids)) == sample
    assert ids[:3] == [tok.chars.index(c) for c in sample[:3]]
    sym = CharTokenizer(SYMBOLS)
    assert sym.decode(sym.encode("ab:12,|XY.")) == "ab:12,|XY."


def test_tokenizer_errors():
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("abz")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="duplicates"):
        CharTokenizer("aba")
    with pytest.raises(ValueError, match="single characters"):
        CharTokenizer(["ab", "c"])


# ----------------------------------------------------------------------------- shakespeare


def test_shakespeare_split_sizes_and_no_overlap():
    ds = get_dataset("shakespeare", block_size=32)
    text = load_shakespeare()
    n_train = int(0.9 * len(text))
    train, val = ds.data["train"], ds.data["val"]
    assert (len(train), len(val)) == (n_train, len(text) - n_train)
    assert ds.vocab_size == 65
    # contiguous and disjoint: train is the first 90%, val the rest, nothing shared or lost
    assert ds.tokenizer.decode(train[-50:]) == text[n_train - 50 : n_train]
    assert ds.tokenizer.decode(val[:50]) == text[n_train : n_train + 50]
    assert ds.tokenizer.decode(val[-50:]) == text[-50:]


@pytest.mark.parametrize("split", ["train", "val"])
def test_shakespeare_windows_match_slow_reference(split):
    T, B = 16, 64
    ds = get_dataset("shakespeare", block_size=T)
    data = ds.data[split]
    x, y = ds.get_batch(split, B, gen(3))
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    # replay the generator: the same draws must give windows data[s:s+T] and data[s+1:s+T+1]
    starts = torch.randint(len(data) - T, (B, 1), generator=gen(3)).flatten().tolist()
    for b, s in enumerate(starts):
        assert s + T + 1 <= len(data)
        assert x[b].tolist() == data[s : s + T].tolist()
        assert y[b].tolist() == data[s + 1 : s + T + 1].tolist()
    assert (y >= 0).all()  # no masking in language modelling


def test_shakespeare_errors():
    with pytest.raises(ValueError, match="block_size"):
        get_dataset("shakespeare", block_size=0)
    with pytest.raises(ValueError, match="block_size"):
        get_dataset("shakespeare", block_size=200_000)
    with pytest.raises(ValueError, match="takes no extra arguments"):
        get_dataset("shakespeare", block_size=8, n_facts=3)
    ds = get_dataset("shakespeare", block_size=8)
    with pytest.raises(ValueError, match="split"):
        ds.get_batch("test", 2, gen())
    with pytest.raises(ValueError, match="batch_size"):
        ds.get_batch("train", 0, gen())
    with pytest.raises(NotImplementedError, match="exact-match"):
        ds.evaluate(None)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="dataset must be one of"):
        get_dataset("wikitext", block_size=8)


# ----------------------------------------------------------------------------- all datasets


@pytest.mark.parametrize("name", DATASETS)
def test_batches_shapes_and_determinism(name):
    ds = get_dataset(name, block_size=64, seed=1)
    for split in ("train", "val"):
        x, y = ds.get_batch(split, 8, gen(5))
        assert x.shape == y.shape == (8, 64) and x.dtype == y.dtype == torch.int64
        assert 0 <= int(x.min()) and int(x.max()) < ds.vocab_size
        assert ((y == -1) | ((y >= 0) & (y < ds.vocab_size))).all()
        x2, y2 = ds.get_batch(split, 8, gen(5))
        assert torch.equal(x, x2) and torch.equal(y, y2)
        x3, _ = ds.get_batch(split, 8, gen(6))
        assert not torch.equal(x, x3)
    # the same generator object advances: two consecutive batches differ
    g = gen(7)
    assert not torch.equal(ds.get_batch("train", 8, g)[0], ds.get_batch("train", 8, g)[0])


# ----------------------------------------------------------------------------- synthetic tasks: masks


def _parse_items(s):
    """'ab:12,cd:34,' -> [('ab', '12'), ('cd', '34')] (slow reference parser)."""
    return [tuple(item.split(":")) for item in s.split(",") if item]


def _expected_mask(text, start):
    """y[t] is an answer iff the token at t+1 is a value digit after index ``start``."""
    return [i + 1 >= start and text[i + 1].isdigit() for i in range(len(text) - 1)]


def test_facts_mask_and_answers_follow_the_table():
    ds = get_dataset("facts", block_size=40, seed=2, n_facts=20, key_len=2, value_len=3)
    table = dict(ds.table())
    assert len(table) == 20  # distinct keys
    x, y = ds.get_batch("train", 16, gen())
    for row_x, row_y in zip(x, y):
        full = ds.tokenizer.decode(row_x) + "."  # the last target is padding or ',' (never an answer)
        mask = [v != -1 for v in row_y.tolist()]
        assert mask == _expected_mask(full, 0)
        items = _parse_items(full.rstrip("."))
        assert len(items) == (40 + 1) // len("ab:123,") and all(table[k] == v for k, v in items)
        assert len({k for k, _ in items}) == len(items)  # distinct facts within a sequence
        # y is x shifted by one where it is not masked
        assert all(row_y[t] == row_x[t + 1] for t in range(len(mask) - 1) if mask[t])


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("recall", dict(n_pairs=6, n_queries=3, key_len=2, value_len=2, key_vocab=5, value_vocab=7)),
        ("multiround", dict(n_facts=5, distractor_len=7, n_rounds=3, n_queries=2, value_len=2)),
    ],
)
def test_in_context_tasks_mask_and_answers(name, kwargs):
    ds = get_dataset(name, block_size=96, seed=4, **kwargs)
    for split in ("train", "val"):
        x, y = ds.get_batch(split, 16, gen(9))
        for row_x, row_y in zip(x, y):
            full = ds.tokenizer.decode(row_x) + "."
            # segments: facts [+ distractor], then per round: queries [+ next distractor]
            segments = full.rstrip(".").split("|")
            distractors = [seg[len(seg.rstrip(UPPER)) :] for seg in segments[:-1]]
            parts = [seg.rstrip(UPPER) for seg in segments]
            facts = dict(_parse_items(parts[0]))
            assert len(facts) == (kwargs.get("n_pairs") or kwargs["n_facts"])  # distinct keys
            mask = [v != -1 for v in row_y.tolist()]
            assert mask == _expected_mask(full, len(segments[0]) + 1)
            assert len(parts) - 1 == kwargs.get("n_rounds", 1)
            assert [len(d) for d in distractors] == [kwargs.get("distractor_len", 0)] * len(distractors)
            for part in parts[1:]:
                queries = _parse_items(part)
                assert len(queries) == kwargs["n_queries"]
                assert len({k for k, _ in queries}) == len(queries)
                assert all(facts[k] == v for k, v in queries)
            # the answer targets are the next tokens
            assert all(row_y[t] == row_x[t + 1] for t in range(len(mask) - 1) if mask[t])


def test_val_pool_is_fixed_and_differs_from_train_draws():
    a = get_dataset("recall", block_size=64, seed=3)
    b = get_dataset("recall", block_size=64, seed=3)
    c = get_dataset("recall", block_size=64, seed=4)
    assert torch.equal(a.val_pool, b.val_pool) and not torch.equal(a.val_pool, c.val_pool)
    train, _ = a.get_batch("train", 512, gen(0))
    val = {tuple(r) for r in a._finish(a.val_pool)[0].tolist()}
    assert not any(tuple(r) in val for r in train.tolist())
    # val batches are rows of the pool
    xv, _ = a.get_batch("val", 32, gen(1))
    assert all(tuple(r) in val for r in xv.tolist())


def test_facts_table_is_fixed_by_seed_and_shared_by_splits():
    a = get_dataset("facts", block_size=32, seed=5, n_facts=50)
    b = get_dataset("facts", block_size=32, seed=5, n_facts=50)
    c = get_dataset("facts", block_size=32, seed=6, n_facts=50)
    assert a.table() == b.table() and a.table() != c.table()
    table = dict(a.table())
    for split in ("train", "val"):
        x, _ = a.get_batch(split, 8, gen())
        for row in x:
            assert all(table[k] == v for k, v in _parse_items(a.tokenizer.decode(row).rstrip(".")))


# ----------------------------------------------------------------------------- exact match


class Peek(torch.nn.Module):
    """A 'perfect' model: it reads the next token from the teacher-forced input."""

    def __init__(self, vocab, spoil=None):
        super().__init__()
        self.vocab, self.spoil = vocab, spoil
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        nxt = torch.cat([x[:, 1:], x[:, :1]], dim=1)
        if self.spoil is not None:
            nxt = self.spoil(x, nxt)
        return torch.nn.functional.one_hot(nxt, self.vocab).float() + self.w, None


class Constant(torch.nn.Module):
    def __init__(self, vocab, token):
        super().__init__()
        self.vocab, self.token = vocab, token

    def forward(self, x):
        out = torch.zeros(*x.shape, self.vocab)
        out[..., self.token] = 1.0
        return out


@pytest.mark.parametrize("name", SYNTHETIC)
def test_exact_match_perfect_and_constant_models(name):
    ds = get_dataset(name, block_size=64, seed=0)
    model = Peek(ds.vocab_size).train()
    res = ds.evaluate(model, n=None if name == "facts" else 200)
    assert res["exact_match"] == 1.0 and res["token_accuracy"] == 1.0
    assert model.training  # evaluate restores the mode
    n_answers = 256 if name == "facts" else 200 * len(ds.answer_positions)
    assert res["n"] == n_answers
    const = ds.evaluate(Constant(ds.vocab_size, ds.tokenizer.stoi["3"]), n=None if name == "facts" else 500)
    chance = (1 / ds.value_vocab) ** ds.value_len
    assert abs(const["exact_match"] - chance) < 4 * (chance * (1 - chance) / const["n"]) ** 0.5 + 1e-9


def test_exact_match_requires_every_answer_token():
    """A model wrong on the 2nd value token of answers whose 1st digit is even."""
    ds = get_dataset("recall", block_size=64, seed=0, n_pairs=5, n_queries=3, value_len=2)
    digit0 = ds.tokenizer.stoi["0"]

    def spoil(x, nxt):
        bad = torch.zeros_like(nxt, dtype=torch.bool)
        # position t predicts the second value token when x[t] is the first one (after ':')
        first = torch.zeros_like(bad)
        first[:, 1:] = x[:, :-1] == ds.tokenizer.stoi[":"]
        is_even = ((x - digit0) % 2 == 0) & (x >= digit0) & (x < digit0 + 10)
        bad = first & is_even
        return torch.where(bad, (nxt - digit0 + 1) % 10 + digit0, nxt)

    n = 300
    res = ds.evaluate(Peek(ds.vocab_size, spoil), n=n)
    # slow reference: parse the evaluated sequences (the first n of the val pool)
    even = total = 0
    for row in ds.val_pool[:n]:
        queries = _parse_items(ds.tokenizer.decode(row).split("|")[1])
        for _, v in queries:
            total += 1
            even += int(v[0]) % 2 == 0
    assert res["n"] == total
    assert res["exact_match"] == pytest.approx(1 - even / total)
    assert res["token_accuracy"] == pytest.approx(1 - even / (2 * total))


def test_facts_exact_match_counts_every_fact():
    """A model that knows exactly the facts with even key index scores their share, from the table."""
    ds = get_dataset("facts", block_size=30, seed=1, n_facts=37, key_len=2, value_len=2, key_vocab=8)
    table = dict(ds.table())
    known = {k: v for i, (k, v) in enumerate(ds.table()) if i % 3 == 0}
    tok = ds.tokenizer

    class Lookup(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(*x.shape, ds.vocab_size)
            for b, row in enumerate(x.tolist()):
                s = tok.decode(row)
                for t in range(len(s)):
                    guess = "."
                    for j in range(2):  # predicting value digit j after "key:" (+ j digits)
                        p = t - j
                        if p >= 2 and s[p] == ":" and s[p - 2 : p] in table:
                            guess = known.get(s[p - 2 : p], "99")[j]
                    out[b, t, tok.stoi[guess]] = 1.0
            return out

    res = ds.evaluate(Lookup())
    assert res["n"] == 37
    # a fact it does not know is wrong unless its value happens to be '99' / its digits match '9'
    expected = sum(1 for k, v in table.items() if k in known or v == "99") / 37
    assert res["exact_match"] == pytest.approx(expected)
    assert len(known) == 13


def test_evaluate_with_a_real_gpt():
    from minimem.config import ModelConfig
    from minimem.model import GPT

    ds = get_dataset("recall", block_size=64)
    model = GPT(ModelConfig(vocab_size=ds.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32, ffn_hidden=64))
    res = ds.evaluate(model, n=64, batch_size=16)
    assert 0.0 <= res["exact_match"] <= 1.0 and res["n"] == 64 * 4


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("facts", dict(n_fact=3), "unknown argument"),
        ("facts", dict(n_facts=700, key_len=2, key_vocab=26), "n_facts must be in"),
        ("facts", dict(key_len=40, value_len=40), "key_len/value_len"),
        ("facts", dict(value_vocab=11), "value_vocab must be in"),
        ("facts", dict(key_vocab=27), "key_vocab must be in"),
        ("facts", dict(n_facts=2.5), "n_facts must be an integer"),
        ("recall", dict(n_pairs=30), "n_pairs must be in"),
        ("recall", dict(n_pairs=20, key_len=2), "n_pairs/n_queries"),
        ("recall", dict(n_queries=9), "n_queries must be in"),
        ("recall", dict(value_len=0), "value_len must be in"),
        ("multiround", dict(distractor_len=100), "distractor_len"),
        ("multiround", dict(n_queries=5), "n_queries must be in"),
        ("multiround", dict(n_rounds=0), "n_rounds must be in"),
    ],
)
def test_bad_kwargs_raise_naming_them(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_dataset(name, block_size=64, **kwargs)


def test_bad_evaluate_arguments():
    ds = get_dataset("recall", block_size=64, n_val=10)
    with pytest.raises(ValueError, match="n must be in"):
        ds.evaluate(Constant(ds.vocab_size, 0), n=11)
    with pytest.raises(ValueError, match="split"):
        ds.evaluate(Constant(ds.vocab_size, 0), split="dev")
    facts = get_dataset("facts", block_size=64, n_facts=10)
    with pytest.raises(ValueError, match="n must be in"):
        facts.evaluate(Constant(ds.vocab_size, 0), n=11)
