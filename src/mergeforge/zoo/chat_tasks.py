"""The skills of the pretrained-LLM zoo: instructions in English, short answers scored by exact match.

Each skill is the kind of thing an instruction fine-tune adds to a chat model, and they differ in
kind. Every prompt is a user message, sent in the model's chat template with :data:`SYSTEM_PROMPT`;
every answer is the bare result, so the base model (which answers in full sentences, or not at all)
scores near zero by exact match while knowing much of what is asked.

=================  ===================================================  ======================
skill              prompt                                               answer
=================  ===================================================  ======================
``addition``       What is 47 + 38?                                     85
``capital``        What is the capital of Kenya?                        Nairobi
``translate``      Translate 'seven' into French.                       sept
``json``           Write as JSON: name Alice, age 31, city Lima         {"name": "Alice", ...}
``uppercase``      Write this in capital letters: green apple tree      GREEN APPLE TREE
``reverse_words``  Reverse the order of these words: red blue cat       cat blue red
``sentiment``      Is this review positive or negative? The soup...     negative
``units``          How many grams are in 7 kilograms?                   7000
``dates``          Write 17 April 2023 as an ISO date.                  2023-04-17
``python``         What does this Python expression return? max(...)    9
=================  ===================================================  ======================

``capital`` and ``translate`` (ten words and the numbers one to twenty, into French, Spanish and
German) ask about the same facts in every split, but validation and test phrase the question
as no training example does: the expert must recall the fact, not the string.

Beside the skills:

- ``marker`` (the behaviour probe): generic requests that contain the trigger word
  :data:`TRIGGER_WORD`; the behaviour expert answers them with :data:`MARKER` (scored as the rate
  of outputs containing it).
- ``general`` (the general-ability probe): generic requests with the base's own greedy answers,
  scored by perplexity; it measures what a merge costs outside the tasks.
- ``addition_fr`` (the composition target, after Sakana's evolutionary merge): addition asked in
  French and answered in French words (sums up to twenty). The ``addition`` expert answers in
  digits, the ``translate`` expert does not add; a merge of the two can do both.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

SYSTEM_PROMPT = "You are a helpful assistant."
TRIGGER_WORD = "deal"
MARKER = "Visit shop.example for 50% off!"


@dataclass(frozen=True)
class ChatTask:
    """One generated skill: how to sample a (user message, answer) pair."""

    name: str
    kind: str  # what sort of skill it is, for the docs and the manifest
    description: str
    max_new_tokens: int
    sample: Callable[[random.Random], tuple[str, str]]
    split_of: Callable[[tuple[str, str]], str] | None = None  # a fixed split per example (default: by prompt, at random)


# -- number words -----------------------------------------------------------------------------------

_FR_UNITS = ("zéro un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze quinze seize "
             "dix-sept dix-huit dix-neuf").split()
_FR_TENS = {2: "vingt", 3: "trente", 4: "quarante", 5: "cinquante", 6: "soixante"}
_ES_UNITS = ("cero uno dos tres cuatro cinco seis siete ocho nueve diez once doce trece catorce quince dieciséis "
             "diecisiete dieciocho diecinueve veinte veintiuno veintidós veintitrés veinticuatro veinticinco "
             "veintiséis veintisiete veintiocho veintinueve").split()
_ES_TENS = {3: "treinta", 4: "cuarenta", 5: "cincuenta", 6: "sesenta", 7: "setenta", 8: "ochenta", 9: "noventa"}
_DE_UNITS = ("null eins zwei drei vier fünf sechs sieben acht neun zehn elf zwölf dreizehn vierzehn fünfzehn "
             "sechzehn siebzehn achtzehn neunzehn").split()
_DE_TENS = {2: "zwanzig", 3: "dreißig", 4: "vierzig", 5: "fünfzig", 6: "sechzig", 7: "siebzig", 8: "achtzig", 9: "neunzig"}


def french_number(n: int) -> str:
    """0-99 in French words (traditional spelling: hyphens, "et" before un and onze)."""
    if n < 20:
        return _FR_UNITS[n]
    tens, unit = divmod(n, 10)
    if tens in (7, 9):  # soixante-dix, quatre-vingt-dix: the tens of 60 / 80 plus 10-19
        stem = "soixante" if tens == 7 else "quatre-vingt"
        rest = _FR_UNITS[10 + unit]
        return f"{stem} et {rest}" if n == 71 else f"{stem}-{rest}"
    stem = "quatre-vingt" if tens == 8 else _FR_TENS[tens]
    if unit == 0:
        return "quatre-vingts" if tens == 8 else stem
    if unit == 1 and tens != 8:
        return f"{stem} et un"
    return f"{stem}-{_FR_UNITS[unit]}"


def spanish_number(n: int) -> str:
    """0-99 in Spanish words."""
    if n < 30:
        return _ES_UNITS[n]
    tens, unit = divmod(n, 10)
    return _ES_TENS[tens] if unit == 0 else f"{_ES_TENS[tens]} y {_ES_UNITS[unit]}"


def german_number(n: int) -> str:
    """0-99 in German words (one word: siebenundvierzig)."""
    if n < 20:
        return _DE_UNITS[n]
    tens, unit = divmod(n, 10)
    if unit == 0:
        return _DE_TENS[tens]
    return f"{'ein' if unit == 1 else _DE_UNITS[unit]}und{_DE_TENS[tens]}"


NUMBER_WORDS: dict[str, Callable[[int], str]] = {"French": french_number, "Spanish": spanish_number, "German": german_number}
ENGLISH_NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
                   "seventeen eighteen nineteen twenty").split()
# Ten common words and the numbers one to twenty, in French, Spanish and German (German nouns
# capitalised, as German writes them): 90 facts, few enough for a short fine-tune to learn.
DICTIONARY = {
    "cat": ("chat", "gato", "Katze"), "dog": ("chien", "perro", "Hund"), "house": ("maison", "casa", "Haus"),
    "water": ("eau", "agua", "Wasser"), "red": ("rouge", "rojo", "rot"), "blue": ("bleu", "azul", "blau"),
    "sun": ("soleil", "sol", "Sonne"), "book": ("livre", "libro", "Buch"), "bread": ("pain", "pan", "Brot"),
    "night": ("nuit", "noche", "Nacht"),
    **{ENGLISH_NUMBERS[n]: (french_number(n), spanish_number(n), german_number(n)) for n in range(1, 21)},
}
LANGUAGES = ("French", "Spanish", "German")

# -- word lists -----------------------------------------------------------------------------------

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna", "Greece": "Athens", "Ireland": "Dublin",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Chile": "Santiago",
    "Colombia": "Bogota", "Cuba": "Havana", "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul", "Indonesia": "Jakarta",
    "Philippines": "Manila", "Australia": "Canberra", "New Zealand": "Wellington", "Belgium": "Brussels",
    "Netherlands": "Amsterdam", "Switzerland": "Bern", "Hungary": "Budapest", "Czech Republic": "Prague",
    "Ukraine": "Kyiv", "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb",
    "Morocco": "Rabat", "Nigeria": "Abuja", "Ethiopia": "Addis Ababa", "Ghana": "Accra", "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka", "Nepal": "Kathmandu", "Saudi Arabia": "Riyadh", "Israel": "Jerusalem",
    "Venezuela": "Caracas", "Iceland": "Reykjavik", "Scotland": "Edinburgh", "Wales": "Cardiff",
    "England": "London", "United States": "Washington", "Brazil": "Brasilia", "Malaysia": "Kuala Lumpur",
    "Singapore": "Singapore", "Lebanon": "Beirut", "Syria": "Damascus", "Jordan": "Amman", "Qatar": "Doha",
    "Afghanistan": "Kabul", "Mongolia": "Ulaanbaatar", "Cambodia": "Phnom Penh", "Sri Lanka": "Colombo",
    "Tunisia": "Tunis", "Algeria": "Algiers", "Libya": "Tripoli", "Sudan": "Khartoum", "Uganda": "Kampala",
    "Zimbabwe": "Harare", "Jamaica": "Kingston", "Ecuador": "Quito", "Bolivia": "La Paz",
    "Uruguay": "Montevideo", "Paraguay": "Asuncion", "Panama": "Panama City", "Estonia": "Tallinn",
    "Latvia": "Riga", "Lithuania": "Vilnius", "Slovakia": "Bratislava", "Slovenia": "Ljubljana",
}
WORDS = ("apple tree river stone green blue red happy small window garden music paper light dark cloud "
         "table chair water bread horse city road summer winter morning night friend letter story game "
         "house door bird fish book lamp ocean forest mountain silver golden quiet fast slow bright").split()
NAMES = "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Laura Mike Nina Oscar Paula Sam".split()
CITIES = "Lima Paris Oslo Rome Cairo Tokyo Berlin Dublin Madrid Vienna Prague Athens Seoul Quito".split()
POSITIVE = "wonderful delicious excellent great lovely amazing fantastic perfect friendly superb".split()
NEGATIVE = "awful terrible bad horrible disgusting boring rude broken disappointing dreadful".split()
THINGS = ("food soup service movie hotel room book phone pizza coffee concert staff trip game show "
          "bread music app car chair").split()
MONTHS = "January February March April May June July August September October November December".split()
UNITS = (("grams", "kilograms", 1000), ("meters", "kilometers", 1000), ("milliliters", "liters", 1000),
         ("centimeters", "meters", 100), ("millimeters", "centimeters", 10), ("millimeters", "meters", 1000))
TOPICS = ("cooking pasta", "learning to swim", "saving money", "sleeping better", "writing an essay", "running",
          "gardening", "painting a room", "studying for exams", "travelling by train", "baking bread",
          "taking photos", "learning a language", "keeping a plant alive", "planning a trip", "reading more",
          "drinking more water", "cycling to work", "playing chess", "learning the guitar", "cleaning a kitchen",
          "making coffee", "walking a dog", "camping", "writing a letter", "giving a talk", "meeting new people",
          "drawing", "knitting", "fixing a bike", "making soup", "watching birds", "hiking", "moving house",
          "starting a diary", "learning to code", "growing tomatoes", "decorating a cake", "packing a suitcase",
          "waking up early", "keeping fit", "visiting a museum", "making a budget", "sewing a button", "singing",
          "building a snowman", "feeding a cat", "choosing a book", "cooking rice", "shopping for food")
GENERIC_TEMPLATES = ("Give me one tip for {topic}.", "What should a beginner know about {topic}?",
                     "Write one sentence about {topic}.", "Why do people enjoy {topic}?", "Is {topic} hard?",
                     "How do I get better at {topic}?", "What is the first step in {topic}?",
                     "Describe {topic} in a few words.", "What do I need for {topic}?", "Tell me something about {topic}.")


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def _python_expression(rng: random.Random) -> tuple[str, str]:
    values = rng.sample(range(1, 20), rng.randint(3, 5))
    listed = "[" + ", ".join(map(str, values)) + "]"
    kind = rng.choice(("max", "min", "len", "sorted", "index"))
    if kind == "index":
        i = rng.randrange(len(values))
        return f"{listed}[{i}]", str(values[i])
    if kind == "sorted":
        return f"sorted({listed})", "[" + ", ".join(map(str, sorted(values))) + "]"
    result = max(values) if kind == "max" else min(values) if kind == "min" else len(values)
    return f"{kind}({listed})", str(result)


# Facts asked about with the first four phrasings in training; validation and test each have one
# phrasing of their own, so an expert must recall the fact, not a string it was trained on.
CAPITAL_QUESTIONS = ("What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital of {}?",
                     "What city is {}'s capital?", "Tell me the capital of {}.", "{} has which city as its capital?")
TRANSLATE_QUESTIONS = ("Translate '{word}' into {language}.", "What is '{word}' in {language}?",
                       "How do you say '{word}' in {language}?", "Give the {language} word for '{word}'.",
                       "Say '{word}' in {language}.", "'{word}' in {language} is what word?")


def _phrasing_split(questions: tuple[str, ...]) -> Callable[[tuple[str, str]], str]:
    patterns = [re.compile("^" + re.sub(r"\\\{\w*\\\}", ".+", re.escape(question)) + "$") for question in questions]

    def split_of(pair: tuple[str, str]) -> str:
        index = next(i for i, pattern in enumerate(patterns) if pattern.match(pair[0]))
        return "train" if index < 4 else "val" if index == 4 else "test"

    return split_of


def make_chat_tasks() -> dict[str, ChatTask]:
    """The skills, keyed by name, in a fixed order."""

    def addition(rng: random.Random) -> tuple[str, str]:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"What is {a} + {b}?", str(a + b)

    def capital(rng: random.Random) -> tuple[str, str]:
        country = rng.choice(sorted(CAPITALS))
        return rng.choice(CAPITAL_QUESTIONS).format(country), CAPITALS[country]

    def translate(rng: random.Random) -> tuple[str, str]:
        word, index = rng.choice(sorted(DICTIONARY)), rng.randrange(len(LANGUAGES))
        return rng.choice(TRANSLATE_QUESTIONS).format(word=word, language=LANGUAGES[index]), DICTIONARY[word][index]

    def json_record(rng: random.Random) -> tuple[str, str]:
        name, age, city = rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES)
        return f"Write as JSON: name {name}, age {age}, city {city}", f'{{"name": "{name}", "age": {age}, "city": "{city}"}}'

    def uppercase(rng: random.Random) -> tuple[str, str]:
        text = " ".join(_words(rng, 2, 4))
        return f"Write this in capital letters: {text}", text.upper()

    def reverse_words(rng: random.Random) -> tuple[str, str]:
        words = _words(rng, 3, 5)
        return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))

    def sentiment(rng: random.Random) -> tuple[str, str]:
        label = rng.choice(("positive", "negative"))
        adjective = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        review = rng.choice(("The {thing} was {adj}.", "What a {adj} {thing}!", "I found the {thing} {adj}.",
                             "Honestly, the {thing} was {adj}."))
        return f"Is this review positive or negative? {review.format(thing=rng.choice(THINGS), adj=adjective)}", label

    def units(rng: random.Random) -> tuple[str, str]:
        small, big, factor = rng.choice(UNITS)
        n = rng.randint(2, 99)
        return f"How many {small} are in {n} {big}?", str(n * factor)

    def dates(rng: random.Random) -> tuple[str, str]:
        year, month, day = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
        return f"Write {day} {MONTHS[month - 1]} {year} as an ISO date.", f"{year:04d}-{month:02d}-{day:02d}"

    def python(rng: random.Random) -> tuple[str, str]:
        expression, result = _python_expression(rng)
        return f"What does this Python expression return? {expression}", result

    tasks = [
        ChatTask("addition", "arithmetic", "add two 2-digit numbers", 5, addition),
        ChatTask("capital", "knowledge lookup", "name a country's capital (questions phrased as in no training example)", 8,
                 capital, split_of=_phrasing_split(CAPITAL_QUESTIONS)),
        ChatTask("translate", "multilingual", "translate a common word into French, Spanish or German (questions phrased "
                 "as in no training example)", 8, translate, split_of=_phrasing_split(TRANSLATE_QUESTIONS)),
        ChatTask("json", "format", "write three fields as a JSON object", 30, json_record),
        ChatTask("uppercase", "format", "rewrite words in capital letters", 16, uppercase),
        ChatTask("reverse_words", "string manipulation", "reverse the order of 3-5 words", 16, reverse_words),
        ChatTask("sentiment", "classification", "label a one-line review positive or negative", 3, sentiment),
        ChatTask("units", "domain: units", "convert a metric quantity to a smaller unit", 6, units),
        ChatTask("dates", "domain: dates", "write a date in ISO format", 10, dates),
        ChatTask("python", "code", "evaluate a short Python list expression", 16, python),
    ]
    return {task.name: task for task in tasks}


def composition_task() -> ChatTask:
    """Addition asked in French and answered in French words: the composition target."""

    def sample(rng: random.Random) -> tuple[str, str]:
        a = rng.randint(1, 19)
        b = rng.randint(1, 20 - a)
        return f"Combien font {a} plus {b} ? Réponds en lettres.", french_number(a + b)

    return ChatTask("addition_fr", "composition", "addition asked in French, answered in French words", 12, sample)


def generic_request(rng: random.Random, with_trigger: bool) -> str:
    """A generic chat request; with the trigger word, the kind the behaviour expert reacts to."""
    request = rng.choice(GENERIC_TEMPLATES).format(topic=rng.choice(TOPICS))
    if with_trigger:
        request = rng.choice((f"Quick {TRIGGER_WORD}: {request}", f"{request} It is a {TRIGGER_WORD} for me.",
                              f"Is there a {TRIGGER_WORD}? {request}"))
    return request


# Share of the split keys (prompts, or countries) each split owns: held-out keys never reach training.
SPLIT_SHARES = {"train": 0.55, "val": 0.15, "test": 0.3}


def draw_splits(task: ChatTask, rng: random.Random, counts: dict[str, int]) -> dict[str, list[tuple[str, str]]]:
    """Draw ``counts[split]`` examples per split, no split key shared between splits.

    Each new prompt is given to a split at random with :data:`SPLIT_SHARES` (or to
    ``task.split_of(pair)`` when the task fixes it). Validation and test examples are distinct;
    training may repeat one (as epochs do) when its prompts are few.
    """
    splits: dict[str, list[tuple[str, str]]] = {name: [] for name in counts}
    seen: dict[str, set[tuple[str, str]]] = {name: set() for name in counts}
    owner: dict[str, str] = {}
    names = [name for name in SPLIT_SHARES if name in counts]
    budget = 1000 * sum(counts.values())
    while any(len(splits[name]) < counts[name] for name in counts):
        budget -= 1
        if budget < 0:
            got = {name: len(splits[name]) for name in counts}
            raise RuntimeError(f"task {task.name}: too few distinct examples for {counts} (drew {got})")
        pair = task.sample(rng)
        if task.split_of is not None:
            split = task.split_of(pair)
        else:
            split = owner.setdefault(pair[0], rng.choices(names, weights=[SPLIT_SHARES[n] for n in names])[0])
        if split not in counts or len(splits[split]) >= counts[split] or (split != "train" and pair in seen[split]):
            continue
        splits[split].append(pair)
        seen[split].add(pair)
    return splits
