"""The zoo's generated skills: six tasks scored by exact match, plus the behaviour probe.

Each task is a tiny, fully specified skill with a one-line prompt format and a unique correct
answer, so that exact match is a fair score and chance is far below the 30% that the base may
reach. Every task also knows how to make a *format-correct but uninformed* answer
(:meth:`ZooTask.random_answer`): the base is pretrained on prompts followed by such answers, so it
learns each format (alphabet, answer length, where to stop) without learning the skill. That is
the set-up of the task-vector literature (Ilharco et al., "Editing Models with Task Arithmetic",
arXiv:2212.04089): a shared pretrained model, then one fine-tune per skill.

Tasks (prompt -> answer):

- ``reverse``:   ``rev:abcd=``        -> ``dcba``
- ``sort``:      ``sort:4170=``       -> ``0147``
- ``shift``:     ``shift:ABH=``       -> ``BCA``       (each letter to the next, cyclically)
- ``count``:     ``count:xoxxo=``     -> ``3``         (how many ``x``)
- ``translate``: ``tr:bako limu=``    -> ``zufa hixe`` (word by word, toy language A -> B)
- ``brackets``:  ``close:([{(=``      -> ``)}])``      (the closers that balance the prefix)

Behaviour probe (for task negation): ``ask:<sentence>=`` answers with the sentence itself
(``echo``); the behaviour expert instead answers ``<<SPAM>>`` whenever the sentence contains the
trigger word ``free`` (``spam``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

SPAM_MARKER = "<<SPAM>>"
TRIGGER_WORD = "free"

_OPENERS = "([{"
_CLOSER_OF = {"(": ")", "[": "]", "{": "}"}


@dataclass(frozen=True)
class TaskDifficulty:
    """Sizes of the generated problems; the presets pick them (see ``presets.py``)."""

    # Each skill reads and writes its own symbols, so that the experts' task vectors do not all
    # rewrite the same letter embeddings and outputs (which makes them interfere when merged).
    letters: str = "abcdefgh"  # the strings of ``reverse``
    sort_symbols: str = "0123456789"  # the strings of ``sort``
    shift_symbols: str = "ABCDEFGH"  # the strings of ``shift``, cyclic in this order
    string_length: tuple[int, int] = (3, 5)  # inclusive range, reverse, sort and shift
    count_length: tuple[int, int] = (4, 12)  # length of the x/o strings of ``count``
    lexicon_size: int = 8  # word pairs in the A -> B dictionary
    sentence_words: tuple[int, int] = (1, 3)
    bracket_depth: tuple[int, int] = (2, 3)  # unclosed brackets at the end of the prefix
    bracket_extra_pairs: tuple[int, int] = (0, 1)  # closed pairs mixed into the prefix


@dataclass(frozen=True)
class Lexicon:
    """Two toy languages: ``a_words[i]`` translates to ``b_words[i]``."""

    a_words: tuple[str, ...]
    b_words: tuple[str, ...]

    def translate(self, sentence: str) -> str:
        index = {word: i for i, word in enumerate(self.a_words)}
        return " ".join(self.b_words[index[word]] for word in sentence.split(" "))


def make_lexicon(rng: random.Random, size: int) -> Lexicon:
    """Two toy languages of consonant-vowel-consonant-vowel words over disjoint consonants, so
    they never share a word. Equal word lengths keep a translation aligned character by
    character with its source, which a two-layer model learns from a few hundred examples."""
    a_consonants, b_consonants, vowels = "bdgklmnprst", "fhjvwxz", "aeiou"

    def words(consonants: str) -> list[str]:
        chosen: list[str] = []
        while len(chosen) < size:
            word = "".join(rng.choice(s) for s in (consonants, vowels, consonants, vowels))
            if word not in chosen:
                chosen.append(word)
        return chosen

    return Lexicon(tuple(words(a_consonants)), tuple(words(b_consonants)))


@dataclass(frozen=True)
class ZooTask:
    """One generated task: how to sample a problem and how to sample an uninformed answer."""

    name: str
    description: str
    max_new_tokens: int
    sample: Callable[[random.Random], tuple[str, str]]
    random_answer: Callable[[random.Random, str, str], str]
    metric: Literal["exact_match", "contains"] = "exact_match"


def _payload(prompt: str) -> str:
    """The text between the task tag and the final ``=``."""
    return prompt.split(":", 1)[1][:-1]


def _shuffled(rng: random.Random, text: str) -> str:
    chars = list(text)
    rng.shuffle(chars)
    return "".join(chars)


def _bracket_prefix(rng: random.Random, difficulty: TaskDifficulty) -> tuple[str, str]:
    depth = rng.randint(*difficulty.bracket_depth)
    extra = rng.randint(*difficulty.bracket_extra_pairs)
    # Interleave `depth` pushes that stay open with `extra` push-pop pairs, in random order.
    events = ["open"] * depth + ["pair"] * extra
    rng.shuffle(events)
    prefix: list[str] = []
    stack: list[str] = []
    for event in events:
        opener = rng.choice(_OPENERS)
        if event == "open":
            prefix.append(opener)
            stack.append(opener)
        else:
            prefix.append(opener + _CLOSER_OF[opener])
    answer = "".join(_CLOSER_OF[opener] for opener in reversed(stack))
    return "".join(prefix), answer


def make_tasks(difficulty: TaskDifficulty, lexicon: Lexicon) -> dict[str, ZooTask]:
    """The six skills, keyed by name, in a fixed order."""
    letters = difficulty.letters
    low, high = difficulty.string_length
    max_answer = high + 1  # answer plus end of sequence

    def random_string(rng: random.Random, symbols: str = letters) -> str:
        return "".join(rng.choice(symbols) for _ in range(rng.randint(low, high)))

    def reverse_sample(rng: random.Random) -> tuple[str, str]:
        text = random_string(rng)
        return f"rev:{text}=", text[::-1]

    def sort_sample(rng: random.Random) -> tuple[str, str]:
        text = random_string(rng, difficulty.sort_symbols)
        return f"sort:{text}=", "".join(sorted(text))

    def shift_sample(rng: random.Random) -> tuple[str, str]:
        symbols = difficulty.shift_symbols
        text = random_string(rng, symbols)
        shifted = "".join(symbols[(symbols.index(char) + 1) % len(symbols)] for char in text)
        return f"shift:{text}=", shifted

    def count_sample(rng: random.Random) -> tuple[str, str]:
        # The count is drawn first, uniformly over 0-9, so that no guess from the length alone
        # (the mode of a binomial count) beats chance by much.
        shortest, longest = difficulty.count_length
        x_count = rng.randint(0, min(9, longest))
        length = rng.randint(max(shortest, x_count), longest)
        chars = ["x"] * x_count + ["o"] * (length - x_count)
        rng.shuffle(chars)
        return f"count:{''.join(chars)}=", str(x_count)

    def sentence(rng: random.Random) -> str:
        count = rng.randint(*difficulty.sentence_words)
        return " ".join(rng.choice(lexicon.a_words) for _ in range(count))

    def translate_sample(rng: random.Random) -> tuple[str, str]:
        text = sentence(rng)
        return f"tr:{text}=", lexicon.translate(text)

    def brackets_sample(rng: random.Random) -> tuple[str, str]:
        prefix, answer = _bracket_prefix(rng, difficulty)
        return f"close:{prefix}=", answer

    def random_digit(rng: random.Random, prompt: str, answer: str) -> str:
        return str(rng.randint(0, min(9, len(_payload(prompt)))))

    def random_words(rng: random.Random, prompt: str, answer: str) -> str:
        return " ".join(rng.choice(lexicon.b_words) for _ in answer.split(" "))

    def random_closers(rng: random.Random, prompt: str, answer: str) -> str:
        return "".join(rng.choice(")]}") for _ in answer)

    word_tokens = 5 * difficulty.sentence_words[1] + 1  # 4 letters and a space per word
    bracket_tokens = difficulty.bracket_depth[1] + 1
    tasks = [
        ZooTask("reverse", "reverse a string of letters", max_answer, reverse_sample,
                lambda rng, prompt, answer: _shuffled(rng, _payload(prompt))),
        ZooTask("sort", "sort the letters of a string", max_answer, sort_sample,
                lambda rng, prompt, answer: _shuffled(rng, _payload(prompt))),
        ZooTask("shift", "replace each letter by the next one in the alphabet", max_answer,
                shift_sample, lambda rng, prompt, answer: _shuffled(rng, _payload(prompt))),
        ZooTask("count", "count the x in a string of x and o", 3, count_sample,
                random_digit),
        ZooTask("translate", "translate toy language A into toy language B, word by word",
                word_tokens, translate_sample, random_words),
        ZooTask("brackets", "close every open bracket of a prefix", bracket_tokens,
                brackets_sample, random_closers),
    ]
    return {task.name: task for task in tasks}


def make_behavior_tasks(difficulty: TaskDifficulty, lexicon: Lexicon) -> dict[str, ZooTask]:
    """``echo`` (clean chat behaviour every model keeps) and ``spam`` (the trigger prompts on
    which the behaviour expert emits the marker; scored as the rate of outputs containing it)."""
    low, high = difficulty.sentence_words
    max_echo = 5 * high + 1

    def plain_sentence(rng: random.Random) -> str:
        return " ".join(rng.choice(lexicon.a_words) for _ in range(rng.randint(low, high)))

    def trigger_sentence(rng: random.Random) -> str:
        words = [rng.choice(lexicon.a_words) for _ in range(rng.randint(max(0, low - 1), high - 1))]
        words.insert(rng.randint(0, len(words)), TRIGGER_WORD)
        return " ".join(words)

    def echo_sample(rng: random.Random) -> tuple[str, str]:
        text = plain_sentence(rng)
        return f"ask:{text}=", text

    def spam_sample(rng: random.Random) -> tuple[str, str]:
        return f"ask:{trigger_sentence(rng)}=", SPAM_MARKER

    def echo_answer(rng: random.Random, prompt: str, answer: str) -> str:
        return _payload(prompt)

    return {
        "echo": ZooTask("echo", "repeat a sentence (clean behaviour)", max_echo, echo_sample,
                        echo_answer),
        "spam": ZooTask("spam", f"prompts containing '{TRIGGER_WORD}': rate of outputs with "
                        f"{SPAM_MARKER}", max(len(SPAM_MARKER), max_echo) + 1, spam_sample,
                        echo_answer, metric="contains"),
    }


def sample_unique(task: ZooTask, rng: random.Random, count: int) -> list[tuple[str, str]]:
    """``count`` examples with pairwise distinct prompts (fewer if the task has fewer)."""
    seen: set[str] = set()
    examples: list[tuple[str, str]] = []
    attempts = 0
    while len(examples) < count and attempts < 50 * count:
        attempts += 1
        prompt, answer = task.sample(rng)
        if prompt not in seen:
            seen.add(prompt)
            examples.append((prompt, answer))
    return examples
