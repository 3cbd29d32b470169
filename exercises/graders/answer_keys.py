"""The conceptual questions' answer keys (exercises/questions.py): salted SHA-256 hashes, no answers.

An answer is normalised first, then hashed with its question's salt:

- a number: rounded to :data:`DIGITS` significant figures (``format(x, ".3g")``: 56.44 -> "56.4",
  262144 -> "2.62e+05"); to forgive a last-bit difference at a rounding boundary, x (1 +- 1e-9)
  are tried too;
- a letter: lower case, without spaces, brackets or a full stop ("(B)." -> "b").

So a key tells right from wrong without saying what is right (guessing a 3-digit number through
the hash is possible, as with any answer key the learner holds: this grades understanding, not
secrecy). ``python -m exercises.graders.answer_keys`` prints the keys of the reference answers
(exercises/reference.py computes them from minimem) for a maintainer who adds a question.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from numbers import Real

DIGITS = 3  # significant figures a numeric answer is graded at


@dataclass(frozen=True)
class Key:
    chapter: int
    kind: str  # "number" or "choice"
    salt: str
    sha256: str
    options: str = ""  # the letters of a choice question


KEYS = {
    "1a": Key(1, "number", "mm-1a-9ccfe820", "8e310cecc628ca776ddb92aace56124b4d6a9d9c8670bb0ee6680bba84db90dc"),
    "1b": Key(
        1, "choice", "mm-1b-cfdaae41", "9dd5f6edac347d3c346749d7dc30686c88a7d33edd47098b98b7bd1e0206153e", "abcd"
    ),
    "2a": Key(2, "number", "mm-2a-bb0cf47c", "9afa247fd84bb0df0d73f755e4fcf5afb9791a016797be3cf56b0d5e816b007f"),
    "3a": Key(3, "number", "mm-3a-3651b0b1", "87817a38c43f79787e2b56d2d053dd5fed02e743e06456e4ec7bbe247ccbc9d6"),
    "3b": Key(3, "choice", "mm-3b-5035b425", "08a72fbaa7076d57ba2198d81196f98d63df6b92e1aad9f70539f2823b67198e", "abc"),
    "4a": Key(4, "number", "mm-4a-a159e35c", "acdb776f8d5b417cc0084fae10669fc2c4bff6fd393eb8bc13106c969e2af87d"),
    "5a": Key(5, "number", "mm-5a-5bf26481", "7f2f54624c58a8d112a2e7b232cd370dc5fc9103120e9eb38f54b3f1dbd642e6"),
    "6a": Key(6, "number", "mm-6a-ee05305c", "6858847998d4110fe3d83303c5c1ce5c74ab944834ca42b7376076c892f8ec1d"),
    "6b": Key(6, "number", "mm-6b-cdbd00c0", "f417b2eb31822246d20ae21b812a6ad7be37484c988104d7df030519b5b41e45"),
    "7a": Key(7, "number", "mm-7a-8db358a6", "93b3633a409ea3d1b3be9393bccd6dedc809247cdb4a1c3ac383c72ad0a52f1c"),
    "8a": Key(8, "choice", "mm-8a-9f5b517a", "91b3f5ae8c01b39f0be3529e4fb647f29e7e2821734ed1de935671137d985a88", "abc"),
    "8b": Key(8, "number", "mm-8b-3ddfe52d", "dee8ee04f3449935242b7065074e7b91c8f7409dae4dac2752d2779fd9f6b777"),
    "9a": Key(9, "number", "mm-9a-c810a913", "d1882ce12f9b21e54d4dc4a57f774867f64e3dbe4929cc4aace01b7cb1a42092"),
    "9b": Key(9, "number", "mm-9b-b448ab2c", "ab4c0eb759eb1cacc40e712077c7308808b7b8a8e8a3981116c9b015397fe7d7"),
}


def normalised_numbers(answer) -> list[str]:
    """The forms a numeric answer is checked in (ValueError when it is not a number)."""
    if isinstance(answer, bool):
        raise ValueError(f"the answer must be a number, got {answer!r}")
    if isinstance(answer, str):
        text = answer.strip().replace(",", "").replace("_", "").replace(" ", "")
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"the answer must be a number, got {answer!r}") from None
    elif isinstance(answer, Real):
        value = float(answer)
    elif hasattr(answer, "item") and getattr(answer, "numel", lambda: 1)() == 1:  # a 0-d tensor or numpy scalar
        value = float(answer.item())
    else:
        raise ValueError(f"the answer must be a number, got {type(answer).__name__} {answer!r}")
    if not math.isfinite(value):
        raise ValueError(f"the answer must be a finite number, got {answer!r}")
    forms = []
    for nudged in (value, value * (1 + 1e-9), value * (1 - 1e-9)):
        form = format(nudged, f".{DIGITS}g")
        form = "0" if float(form) == 0 else form  # -0 and 0
        if form not in forms:
            forms.append(form)
    return forms


def normalised_choice(answer, options: str) -> str:
    """The letter of a choice answer (ValueError when it is not one of ``options``)."""
    if not isinstance(answer, str):
        raise ValueError(f"the answer must be the letter of an option ({', '.join(options)}), got {answer!r}")
    letter = answer.strip().strip("().").strip().lower()
    if len(letter) != 1 or letter not in options:
        raise ValueError(f"the answer must be the letter of an option ({', '.join(options)}), got {answer!r}")
    return letter


def digest(salt: str, normalised: str) -> str:
    return hashlib.sha256(f"{salt}:{normalised}".encode()).hexdigest()


def is_right(question: str, answer) -> bool:
    """Whether ``answer`` is right (ValueError naming the expected form when it cannot be read)."""
    key = KEYS[question]
    forms = normalised_numbers(answer) if key.kind == "number" else [normalised_choice(answer, key.options)]
    return any(digest(key.salt, form) == key.sha256 for form in forms)


def make_key(question: str, chapter: int, answer, options: str = "") -> Key:
    """The key of a right ``answer`` (for a maintainer adding a question)."""
    salt = f"mm-{question}-" + hashlib.sha256(f"minimem {question}".encode()).hexdigest()[:8]
    if options:
        return Key(chapter, "choice", salt, digest(salt, normalised_choice(answer, options)), options)
    return Key(chapter, "number", salt, digest(salt, normalised_numbers(answer)[0]))


# --------------------------------------------------------------------------- the graders' side


def question_ids(chapter: int) -> list[str]:
    return [question for question, key in KEYS.items() if key.chapter == chapter]


def check_answer(answers, question: str) -> None:
    """NotImplementedError while unanswered; AssertionError for an unreadable or a wrong answer."""
    if not isinstance(answers, dict):
        raise AssertionError(f"ANSWERS in exercises/questions.py must be a dict, got {type(answers).__name__}")
    answer = answers.get(question)
    if answer is None:
        raise NotImplementedError(f"question {question} is not answered yet (ANSWERS in exercises/questions.py)")
    try:
        right = is_right(question, answer)
    except ValueError as err:
        raise AssertionError(f"question {question}: {err}") from None
    if not right:
        how = f"at {DIGITS} significant figures" if KEYS[question].kind == "number" else "the option"
        raise AssertionError(f"question {question}: {answer!r} is not the right answer ({how})")


def questions_class(chapter: int):
    """The grader class of ``chapter``'s questions: one 1-point test per question (exercise "questions")."""
    import pytest

    class TestQuestions:
        @pytest.mark.points(1)
        @pytest.mark.hint(
            f"QUESTIONS in exercises/questions.py asks it; work it out from chapter {chapter}, the Specification and "
            "minimem's code; numbers count at 3 significant figures, choices by their letter"
        )
        @pytest.mark.parametrize("question", question_ids(chapter))
        def test_answer(self, answers, question):
            check_answer(answers, question)

    return pytest.mark.exercise("questions")(TestQuestions)


if __name__ == "__main__":
    from exercises.questions import QUESTIONS
    from exercises.reference import question_answers

    for qid, value in question_answers().items():
        options = "".join(c for c in "abcde" if f" {c}) " in QUESTIONS[qid] or QUESTIONS[qid].endswith(f" {c})"))
        print(f"    {qid!r}: {make_key(qid, int(qid[0]), value, options)!r},")
