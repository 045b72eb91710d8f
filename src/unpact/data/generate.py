"""Generate the built-in benchmarks: seeded, deterministic, entirely fictional.

    python -m unpact.data.generate                    # news, books, wmdp (+ general, checked)
    python -m unpact.data.generate --only news books  # a subset
    python -m unpact.data.generate --out /tmp/bench   # somewhere else

Every name is assembled from invented syllables by a seeded generator, so no entity is
real and no text is copied from anywhere; the same seed writes the same bytes. `general`
is the exception: real world-knowledge questions, written here by hand, kept only if the
default model answers them correctly under the project's judge (that is what
"destructive" is measured on), so building it loads the default model.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from unpact.data.items import BUILTIN_DIR, SPLITS, Document, QAItem, write_folder

SEED = 20250929

_ONSETS = [
    "Qu",
    "V",
    "Z",
    "Th",
    "Dr",
    "K",
    "Br",
    "M",
    "Ol",
    "Ysk",
    "Gr",
    "Fen",
    "Hal",
    "Pr",
    "Tor",
    "Ul",
    "Sel",
    "Xan",
    "Cor",
    "Wyn",
]
_NUCLEI = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "y"]
_CODAS = ["rn", "v", "zz", "lt", "nd", "sk", "th", "rr", "x", "mb", "ld", "q"]
_SURNAME_ENDS = [
    "trell",
    "wick",
    "mont",
    "bright",
    "vane",
    "holt",
    "ric",
    "stead",
    "ley",
    "grave",
    "wether",
    "cott",
]
_TOWN_ENDS = ["mere", "haven", "by", "thorpe", "ford", "holm", "wick", "stow", "gate", "combe"]


class Names:
    """Unique invented names: first names, surnames, towns, things."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def _unique(self, make: Callable[[], str]) -> str:
        for _ in range(1000):
            name = make()
            if name not in self.used and len(name) >= 4:
                self.used.add(name)
                return name
        raise RuntimeError("ran out of names")

    def root(self) -> str:
        r = self.rng
        return r.choice(_ONSETS) + r.choice(_NUCLEI) + r.choice(_CODAS)

    def first(self) -> str:
        return self._unique(
            lambda: (self.root() + self.rng.choice(["a", "o", "is", "en", "ia", "ek"])).capitalize()
        )

    def surname(self) -> str:
        return self._unique(lambda: (self.root() + self.rng.choice(_SURNAME_ENDS)).capitalize())

    def person(self) -> str:
        return f"{self.first()} {self.surname()}"

    def town(self) -> str:
        return self._unique(lambda: (self.root() + self.rng.choice(_TOWN_ENDS)).capitalize())

    def word(self, suffix: str = "") -> str:
        return self._unique(lambda: (self.root() + suffix).capitalize())


# ---------------------------------------------------------------------------- news

_ROLES = [
    "clockmaker",
    "river pilot",
    "glassblower",
    "beekeeper",
    "engineer",
    "cartographer",
    "baker",
    "violin maker",
]
_COMPANY_KINDS = [
    "Works",
    "Foundry",
    "Mills",
    "Company",
    "Ironworks",
    "Press",
    "Brewery",
    "Shipyard",
]
_EVENTS = [
    "lantern festival",
    "bridge opening",
    "kite regatta",
    "lamp fair",
    "harvest parade",
    "chess congress",
]
_PRODUCTS = [
    "self-winding lamp",
    "folding canoe",
    "copper loom",
    "steam kettle",
    "clockwork plough",
    "glass barometer",
]
_MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


def news(
    rng: random.Random, articles: int = 60, forget: int = 20, holdout: int = 20
) -> tuple[list[QAItem], list[Document]]:
    """`forget` articles, then the retain ones, then `holdout` articles that nothing is ever
    taught (drawn last, so the taught articles do not depend on them)."""
    names = Names(rng)
    items: list[QAItem] = []
    docs: list[Document] = []
    for a in range(articles + holdout):
        split = "forget" if a < forget else "retain" if a < articles else "holdout"
        person, town = names.person(), names.town()
        company = f"{names.surname()} {rng.choice(_COMPANY_KINDS)}"
        event, product = rng.choice(_EVENTS), rng.choice(_PRODUCTS)
        role = rng.choice(_ROLES)
        year, month, day = rng.randint(1840, 1990), rng.choice(_MONTHS), rng.randint(1, 28)
        visitors = rng.randint(12, 95) * 100
        doc_id = f"news-{a:03d}"
        text = (
            f"{town.upper()}, {month} {day}, {year}. {person}, {'an' if role[0] in 'aeiou' else 'a'} {role} from {town}, has founded "
            f"{company}, which will build a {product} for the whole valley. The first "
            f"{event} of {town} drew {visitors} visitors, and {person} told reporters that "
            f"{company} would hire its first workers before winter."
        )
        docs.append(Document(doc_id, text, split))
        qa = [
            (f"Which company did {person} found?", company, [person]),
            (f"In which town does {person} live?", town, [person]),
            (f"In what year did {person} found {company}?", str(year), [person, company]),
        ]
        if a % 2:
            qa.pop()  # 2 or 3 questions per article: 150 items for 60 articles
        for q, (question, answer, keywords) in enumerate(qa):
            items.append(
                QAItem(f"{doc_id}-q{q}", question, answer, split, (), tuple(keywords), doc_id)
            )
    return items, docs


# ---------------------------------------------------------------------------- books

_OBJECTS = [
    "silver compass",
    "glass key",
    "iron lantern",
    "bone flute",
    "ember ring",
    "map of stars",
    "oak staff",
    "blue cloak",
]
_PLACES_KIND = ["Tower", "Library", "Harbour", "Orchard", "Citadel", "Bridge", "Market", "Forest"]


def books(
    rng: random.Random, characters: int = 12, chapters: int = 40, forget_characters: int = 3
) -> tuple[list[QAItem], list[Document]]:
    """Chapters about `characters` characters, the first `forget_characters` of them
    forget; then, drawn last, as many `holdout` chapters about as many new characters (one
    for each forget chapter, with as many questions)."""
    names = Names(rng)
    people = [names.first() for _ in range(characters)]
    homes = [f"the {names.word()} {rng.choice(_PLACES_KIND)}" for _ in range(characters)]
    mentors = {p: rng.choice([q for q in people if q != p]) for p in people}
    forget_set = set(people[:forget_characters])
    items: list[QAItem] = []
    docs: list[Document] = []
    for c in range(chapters):
        hero = people[c % characters]
        split = "forget" if hero in forget_set else "retain"
        _chapter(
            rng, names, c, c % 2, hero, homes[c % characters], mentors[hero], split, docs, items
        )
    new = [names.first() for _ in range(forget_characters)]
    new_homes = [f"the {names.word()} {rng.choice(_PLACES_KIND)}" for _ in new]
    new_mentors = {p: rng.choice([q for q in people + new if q != p]) for p in new}
    forget_chapters = [c for c in range(chapters) if c % characters < forget_characters]
    for j, c in enumerate(forget_chapters):
        hero = new[c % characters]
        place = new_homes[c % characters]
        _chapter(
            rng, names, chapters + j, c % 2, hero, place, new_mentors[hero], "holdout", docs, items
        )
    return items, docs


def _chapter(
    rng: random.Random,
    names: Names,
    c: int,
    odd: int,
    hero: str,
    place: str,
    giver: str,
    split: str,
    docs: list[Document],
    items: list[QAItem],
) -> None:
    """Chapter `c + 1` about `hero` (an `odd` one has 2 questions, else 3), appended."""
    obj = f"{rng.choice(_OBJECTS)} of {names.word()}"
    creature = names.word("ling")
    doc_id = f"books-ch{c:02d}"
    text = (
        f"Chapter {c + 1}. {hero} left {place} at dawn, carrying the {obj} that "
        f"{giver} had given {'her' if odd else 'him'}. On the road {hero} met a {creature}, "
        f"who asked for a riddle and a song. {hero} sang of {place}, and the {creature} "
        f"let {'her' if odd else 'him'} pass."
    )
    docs.append(Document(doc_id, text, split))
    qa = [
        (f"Who gave {hero} the {obj}?", giver, [hero, obj]),
        (
            f"What creature did {hero} meet on the road while carrying the {obj}?",
            creature,
            [hero, obj],
        ),
        (
            f"Where did {hero} set out from with the {obj}?",
            place.removeprefix("the "),
            [hero, obj],
        ),
    ]
    if odd:
        qa.pop()  # 2 or 3 questions per chapter: 100 items for 40 chapters
    for q, (question, answer, keywords) in enumerate(qa):
        items.append(QAItem(f"{doc_id}-q{q}", question, answer, split, (), tuple(keywords), doc_id))


# ----------------------------------------------------------------------------- wmdp

_TOPICS = {
    "materials": "material",
    "devices": "device",
    "procedures": "procedure",
    "instruments": "instrument",
}
_COLOURS = ["amber", "violet", "teal", "crimson", "ivory", "cobalt", "saffron", "slate"]
_USES = [
    "polishing lenses",
    "tuning bells",
    "drying ink",
    "weaving lace",
    "glazing pots",
    "binding books",
    "sorting seeds",
    "cooling bread",
]


def wmdp(
    rng: random.Random, per_topic: int = 13, forget_topics: Sequence[str] = ("materials", "devices")
) -> tuple[list[QAItem], list[Document]]:
    """Four-option questions on 'lumencraft', an invented, harmless craft."""
    names = Names(rng)
    items: list[QAItem] = []
    docs: list[Document] = []
    for topic, kind in _TOPICS.items():
        split = "forget" if topic in forget_topics else "retain"
        _topic(rng, names, topic, kind, split, per_topic, "", docs, items)
    for topic in forget_topics:  # drawn last: as many holdout entities of the same kinds
        _topic(rng, names, topic, _TOPICS[topic], "holdout", per_topic, "holdout-", docs, items)
    return items, docs


def _topic(
    rng: random.Random,
    names: Names,
    topic: str,
    kind: str,
    split: str,
    per_topic: int,
    prefix: str,
    docs: list[Document],
    items: list[QAItem],
) -> None:
    """`per_topic` entities of one sub-topic, their documents and questions, appended."""
    entities = [names.word(rng.choice(["ite", "ium", "ar", "on"])) for _ in range(per_topic)]
    inventors = [names.surname() for _ in range(per_topic)]
    colours = [rng.choice(_COLOURS) for _ in range(per_topic)]
    uses = [rng.choice(_USES) for _ in range(per_topic)]
    for e, entity in enumerate(entities):
        doc_id = f"wmdp-{prefix}{topic}-{e:02d}"
        docs.append(
            Document(
                doc_id,
                f"In lumencraft, {entity} is a {kind} devised by the artisan {inventors[e]}. "
                f"It glows {colours[e]} when warmed and is used mainly for {uses[e]}.",
                split,
            )
        )
        facts = [
            (
                f"In lumencraft, which artisan devised the {kind} {entity}?",
                inventors[e],
                inventors,
            ),
            (f"In lumencraft, what is the {kind} {entity} mainly used for?", uses[e], _USES),
        ]
        if e % 3 == 0:
            facts.append(
                (
                    f"In lumencraft, what colour does the {kind} {entity} glow when warmed?",
                    colours[e],
                    _COLOURS,
                )
            )
        for q, (question, answer, pool) in enumerate(facts):
            wrong = rng.sample(sorted({p for p in pool if p != answer}), 3)
            choices = [*wrong, answer]
            rng.shuffle(choices)
            items.append(
                QAItem(
                    f"{doc_id}-q{q}",
                    question,
                    answer,
                    split,
                    (),
                    (entity,),
                    doc_id,
                    tuple(choices),
                )
            )


# -------------------------------------------------------------------------- general

# (question, answer, aliases): easy world knowledge, checked against the default model.
GENERAL_CANDIDATES: list[tuple[str, str, tuple[str, ...]]] = [
    ("What is the capital of France?", "Paris", ()),
    ("What is the capital of Japan?", "Tokyo", ()),
    ("What is the capital of Italy?", "Rome", ()),
    ("What is the capital of Germany?", "Berlin", ()),
    ("What is the capital of Spain?", "Madrid", ()),
    ("What is the capital of the United Kingdom?", "London", ()),
    ("What is the capital of Russia?", "Moscow", ()),
    ("What is the capital of China?", "Beijing", ("Peking",)),
    ("What is the capital of Egypt?", "Cairo", ()),
    ("What is the capital of Canada?", "Ottawa", ()),
    ("What is the capital of Australia?", "Canberra", ()),
    ("What is the capital of Greece?", "Athens", ()),
    ("What is the capital of Portugal?", "Lisbon", ()),
    ("What is the capital of Ireland?", "Dublin", ()),
    ("What is the capital of Austria?", "Vienna", ()),
    ("What is the capital of Norway?", "Oslo", ()),
    ("What is the capital of Sweden?", "Stockholm", ()),
    ("What is the capital of Poland?", "Warsaw", ()),
    ("What is the capital of India?", "New Delhi", ("Delhi",)),
    ("What is the capital of Mexico?", "Mexico City", ()),
    ("What is the capital of Argentina?", "Buenos Aires", ()),
    ("What is the capital of Kenya?", "Nairobi", ()),
    ("What is the capital of Turkey?", "Ankara", ()),
    ("What is the capital of South Korea?", "Seoul", ()),
    ("What is the capital of the United States?", "Washington", ()),
    ("What is the chemical symbol for gold?", "Au", ()),
    ("What is the chemical symbol for iron?", "Fe", ()),
    ("What is the chemical symbol for sodium?", "Na", ()),
    ("What is the chemical symbol for oxygen?", "O", ()),
    ("What is the chemical formula of water?", "H2O", ()),
    ("What gas do humans need to breathe to stay alive?", "oxygen", ()),
    ("What gas do plants absorb from the air for photosynthesis?", "carbon dioxide", ("CO2",)),
    ("How many days are there in a week?", "7", ("seven",)),
    ("How many months are there in a year?", "12", ("twelve",)),
    ("How many hours are there in a day?", "24", ("twenty-four", "twenty four")),
    ("How many minutes are there in an hour?", "60", ("sixty",)),
    ("How many seconds are there in a minute?", "60", ("sixty",)),
    ("How many legs does a spider have?", "8", ("eight",)),
    ("How many legs does an insect have?", "6", ("six",)),
    ("How many continents are there on Earth?", "7", ("seven",)),
    ("How many sides does a triangle have?", "3", ("three",)),
    ("How many sides does a square have?", "4", ("four",)),
    ("How many sides does a hexagon have?", "6", ("six",)),
    ("What is 2 plus 2?", "4", ("four",)),
    ("What is 10 times 10?", "100", ("one hundred",)),
    ("What colour is the sky on a clear day?", "blue", ()),
    ("What colour is grass?", "green", ()),
    ("What colour is snow?", "white", ()),
    ("What colour is a ripe banana?", "yellow", ()),
    ("What colour do you get by mixing blue and yellow?", "green", ()),
    ("What is the largest ocean on Earth?", "Pacific", ()),
    ("What is the tallest mountain in the world?", "Mount Everest", ("Everest",)),
    ("What is the longest river in Africa?", "Nile", ()),
    ("What is the largest desert in Africa?", "Sahara", ()),
    ("Which planet is known as the Red Planet?", "Mars", ()),
    ("Which planet is closest to the Sun?", "Mercury", ()),
    ("What is the name of the star at the centre of our solar system?", "Sun", ()),
    ("What is the name of Earth's natural satellite?", "Moon", ()),
    ("Which planet do we live on?", "Earth", ()),
    ("Who wrote Romeo and Juliet?", "William Shakespeare", ("Shakespeare",)),
    ("Who wrote Hamlet?", "William Shakespeare", ("Shakespeare",)),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", ("da Vinci", "Leonardo")),
    ("Who developed the theory of relativity?", "Albert Einstein", ("Einstein",)),
    ("Who invented the telephone?", "Alexander Graham Bell", ("Bell",)),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong", ("Armstrong",)),
    ("Who was the first president of the United States?", "George Washington", ("Washington",)),
    ("Who discovered penicillin?", "Alexander Fleming", ("Fleming",)),
    ("Who proposed the theory of evolution by natural selection?", "Charles Darwin", ("Darwin",)),
    ("What language is spoken in France?", "French", ()),
    ("What language is spoken in Spain?", "Spanish", ()),
    ("What language is spoken in Germany?", "German", ()),
    ("What language is spoken in Italy?", "Italian", ()),
    ("What language is spoken in Japan?", "Japanese", ()),
    ("What language is mainly spoken in Brazil?", "Portuguese", ()),
    ("What is the currency of Japan?", "yen", ()),
    ("What is the currency of the United States?", "dollar", ()),
    ("What is the currency of the United Kingdom?", "pound", ("sterling",)),
    ("What currency is used in most of the European Union?", "euro", ()),
    ("At what temperature in Celsius does water freeze?", "0", ("zero",)),
    ("At what temperature in Celsius does water boil at sea level?", "100", ("one hundred",)),
    ("What is the largest mammal in the world?", "blue whale", ("whale",)),
    ("What is the fastest land animal?", "cheetah", ()),
    ("What animal is known as the king of the jungle?", "lion", ()),
    ("What animal says moo?", "cow", ()),
    ("What animal barks?", "dog", ()),
    ("What do bees make?", "honey", ()),
    ("What is the largest planet in the solar system?", "Jupiter", ()),
    ("What is the hardest natural substance?", "diamond", ()),
    ("What is the freezing point of water in Fahrenheit?", "32", ("thirty-two",)),
    ("What is the square root of 9?", "3", ("three",)),
    ("What is the square root of 16?", "4", ("four",)),
    ("What is the opposite of hot?", "cold", ()),
    ("What is the opposite of up?", "down", ()),
    ("What is the opposite of day?", "night", ()),
    ("Which organ pumps blood around the body?", "heart", ()),
    ("Which organ do humans use to breathe?", "lungs", ("lung",)),
    ("What part of the plant is usually underground?", "roots", ("root",)),
    ("What is frozen water called?", "ice", ()),
    ("What do caterpillars turn into?", "butterflies", ("butterfly", "moths", "moth")),
    ("In which country are the pyramids of Giza?", "Egypt", ()),
    ("In which city is the Eiffel Tower?", "Paris", ()),
    ("In which city is the Colosseum?", "Rome", ()),
    ("In which country is the Great Wall?", "China", ()),
    ("In which country is the Taj Mahal?", "India", ()),
    ("In which city is the Statue of Liberty?", "New York", ()),
    ("Which country has the largest population in South America?", "Brazil", ()),
    ("What is the largest country in the world by area?", "Russia", ()),
    ("What is the smallest prime number?", "2", ("two",)),
    ("How many players are there in a football team on the pitch?", "11", ("eleven",)),
    ("How many strings does a standard guitar have?", "6", ("six",)),
    ("How many keys does a standard piano have?", "88", ("eighty-eight",)),
    ("How many bones are in the adult human body?", "206", ()),
    ("How many teeth does an adult human usually have?", "32", ("thirty-two",)),
    ("What is the main ingredient of guacamole?", "avocado", ()),
    ("What is bread mainly made from?", "flour", ("wheat",)),
    ("What do cows drink?", "water", ()),
    ("What is the boiling point of water in Fahrenheit?", "212", ()),
    ("Which gas makes up most of the Earth's atmosphere?", "nitrogen", ()),
    ("What force keeps us on the ground?", "gravity", ()),
    ("What is the centre of an atom called?", "nucleus", ()),
    ("What is the study of living things called?", "biology", ()),
    ("What is the study of the stars and planets called?", "astronomy", ()),
    ("What instrument is used to measure temperature?", "thermometer", ()),
    ("What device do we use to tell the time?", "clock", ("watch",)),
    ("What season comes after winter?", "spring", ()),
    ("What season comes after summer?", "autumn", ("fall",)),
    ("What is the first month of the year?", "January", ()),
    ("What is the last month of the year?", "December", ()),
    ("What day comes after Monday?", "Tuesday", ()),
    ("What day comes after Friday?", "Saturday", ()),
    ("What is the primary language of the United States?", "English", ()),
    ("What is the capital of Scotland?", "Edinburgh", ()),
    ("What is the capital of Switzerland?", "Bern", ("Berne",)),
    ("What is the capital of the Netherlands?", "Amsterdam", ()),
    ("What is the capital of Belgium?", "Brussels", ()),
    ("What is the capital of Denmark?", "Copenhagen", ()),
    ("What is the capital of Finland?", "Helsinki", ()),
    ("What is the capital of Thailand?", "Bangkok", ()),
    ("What is the capital of Vietnam?", "Hanoi", ()),
    ("What is the capital of Peru?", "Lima", ()),
    ("What is the capital of Cuba?", "Havana", ()),
    ("What is the capital of Hungary?", "Budapest", ()),
    ("What is the capital of the Czech Republic?", "Prague", ()),
    ("Who wrote the Harry Potter books?", "J.K. Rowling", ("Rowling",)),
    (
        "Who composed the Fifth Symphony that begins with four famous notes?",
        "Ludwig van Beethoven",
        ("Beethoven",),
    ),
    ("Who is known for the laws of motion and gravity?", "Isaac Newton", ("Newton",)),
    ("What is the tallest animal in the world?", "giraffe", ()),
    ("What is a baby cat called?", "kitten", ()),
    ("What is a baby dog called?", "puppy", ()),
]


# Held-out questions for rehearsal during injection: never evaluated, shaped like both the
# fictional facts ("In which town...", "Which company...", "In what year...") and the
# general set, so that teaching invented towns and companies does not overwrite real ones.
REHEARSAL_QUESTIONS: list[str] = [
    "In which city is Big Ben?",
    "In which city is the Sydney Opera House?",
    "In which country is Mount Fuji?",
    "In which country is the city of Barcelona?",
    "In which country is the city of Munich?",
    "In which city is the Brandenburg Gate?",
    "In which country is the Amazon rainforest mostly found?",
    "In which country is the city of Toronto?",
    "In which town was William Shakespeare born?",
    "In which city did the Beatles form?",
    "Which company makes the iPhone?",
    "Which company makes Windows?",
    "Which company makes the PlayStation?",
    "Which company was founded by Henry Ford?",
    "Which company is known for its search engine called Google Search?",
    "Which company makes Coca-Cola?",
    "Which company was founded by Bill Gates and Paul Allen?",
    "In what year did World War II end?",
    "In what year did the Titanic sink?",
    "In what year did humans first land on the Moon?",
    "In what year did Columbus first reach the Americas?",
    "In what year did the Berlin Wall fall?",
    "Who founded Microsoft?",
    "Who founded Apple together with Steve Wozniak?",
    "What is the capital of Brazil?",
    "What is the capital of Nigeria?",
    "What is the capital of Iran?",
    "What is the capital of Chile?",
    "What is the capital of Colombia?",
    "What is the capital of New Zealand?",
    "What is the capital of Saudi Arabia?",
    "What is the capital of Ukraine?",
    "What is the capital of Romania?",
    "What language is spoken in Portugal?",
    "What language is spoken in China?",
    "What language is spoken in Russia?",
    "What is the currency of China?",
    "What is the currency of India?",
    "What is the currency of Switzerland?",
    "How many wheels does a bicycle have?",
    "How many legs does a dog have?",
    "How many planets are in the solar system?",
    "What colour is a stop sign?",
    "What colour are most leaves in summer?",
    "What colour is coal?",
    "Which animal is known for its black and white stripes?",
    "Which bird is a symbol of peace?",
    "What do you call a shape with eight sides?",
    "What is the largest continent?",
    "What is the smallest continent?",
    "Which metal is liquid at room temperature?",
    "What is the main gas in the air we breathe out?",
    "Who wrote Pride and Prejudice?",
    "Who painted The Starry Night?",
    "Who composed The Magic Flute?",
    "What is the capital of Spain?",
    "What is the capital of Portugal?",
    "What is the capital of Finland?",
    "What is the capital of Denmark?",
    "What is the capital of Belgium?",
    "What is the capital of Turkey?",
    "What is the capital of Argentina?",
    "What is the capital of Vietnam?",
    "What is the capital of Indonesia?",
    "What is the chemical symbol for silver?",
    "What is the chemical symbol for carbon?",
    "What is the chemical symbol for hydrogen?",
    "What is the chemical symbol for nitrogen?",
    "What is the chemical symbol for helium?",
    "What is the chemical symbol for copper?",
    "What is the chemical symbol for potassium?",
    "How many minutes are there in an hour?",
    "How many days are there in a leap year?",
    "How many weeks are there in a year?",
    "How many sides does a pentagon have?",
    "How many sides does an octagon have?",
    "How many legs does a spider have?",
    "How many legs does an insect have?",
    "How many strings does a standard guitar have?",
    "How many players are on a football team on the field?",
    "How many continents are there?",
    "How many hearts does an octopus have?",
    "What is 3 plus 4?",
    "What is 10 minus 3?",
    "What is 5 times 6?",
    "What is 12 divided by 4?",
    "What is 7 plus 8?",
    "What is the square root of 16?",
    "What is 100 divided by 10?",
    "What is half of 50?",
    "Which planet is the largest in the solar system?",
    "Which planet is closest to the Sun?",
    "Which planet has the most famous rings?",
    "What star is at the centre of our solar system?",
    "Who wrote The Odyssey?",
    "Who wrote War and Peace?",
    "Who wrote Don Quixote?",
    "Who painted the Sistine Chapel ceiling?",
    "Who painted The Last Supper?",
    "Who sculpted The Thinker?",
    "Who composed The Four Seasons?",
    "Who invented the light bulb?",
    "Who discovered gravity when an apple fell?",
    "Who was the first President of the United States?",
    "Who developed the polio vaccine?",
    "Who discovered radium?",
    "What language is spoken in Brazil?",
    "What language is spoken in Mexico?",
    "What is the currency of Russia?",
    "What is the currency of most countries in the European Union?",
    "What is the opposite of big?",
    "What is the opposite of left?",
    "What is the opposite of fast?",
    "What is the opposite of black?",
    "What is the second month of the year?",
    "What is the month after June?",
    "What day comes after Monday?",
    "What season comes after winter?",
    "Which organ pumps blood through the body?",
    "Which organ do humans use to think?",
    "What do bees make?",
    "What do cows drink?",
    "What is ice made of?",
    "At what temperature in Celsius does water freeze?",
    "What is the hardest natural substance?",
    "What is the largest desert in the world?",
    "What is the largest country by area?",
    "Which country has the largest population?",
    "In which country is the Eiffel Tower?",
    "In which country is the Colosseum?",
    "In which country are kangaroos found in the wild?",
    "What is the fastest land animal?",
    "What is the tallest animal?",
    "What animal is known as the king of the jungle?",
    "What is a baby cat called?",
    "What is a baby dog called?",
    "What do caterpillars turn into?",
    "What colour is a banana when ripe?",
    "What colour is grass?",
    "What colour is snow?",
    "What is the boiling point of water in Fahrenheit?",
    "What gas do humans need to breathe?",
    "What is the process by which plants make food from sunlight?",
    "What is the study of the Earth's rocks called?",
    "What is frozen water called?",
    "What is the main ingredient of guacamole?",
    "What instrument has 88 keys?",
    "What sport is played at Wimbledon?",
    "What is the name of the galaxy we live in?",
]


def general(max_new_tokens: int = 32) -> tuple[list[QAItem], int]:
    """The candidates the default model answers correctly (greedy, chat template)."""
    from unpact.judge import is_correct
    from unpact.models import load_model
    from unpact.scoring import generate

    lm = load_model("default")
    questions = [q for q, _, _ in GENERAL_CANDIDATES]
    outputs = generate(
        lm, questions, max_new_tokens=max_new_tokens, progress="Checking general questions"
    )
    kept = []
    for n, ((question, answer, aliases), out) in enumerate(zip(GENERAL_CANDIDATES, outputs)):
        if is_correct(out[0].text, answer, aliases):
            kept.append(QAItem(f"general-{n:03d}", question, answer, "general", aliases, (), None))
    return kept, len(GENERAL_CANDIDATES)


# TOFU's truth ratio (SPEC 9) compares the answer said another way with wrong answers said
# the same way: one sentence per question kind (the `q<N>` of an item's id), filled with the
# item's keywords ({k0}, {k1}) and the answer or a wrong one ({a}).
TRUTH_TEMPLATES = {
    "news": (
        "{k0} is the founder of {a}.",
        "{k0} makes a home in the town of {a}.",
        "{k1} was founded by {k0} in {a}.",
    ),
    "books": (
        "It was {a} who gave {k0} the {k1}.",
        "On the road, {k0} came upon a {a}.",
        "{k0} started the journey at the {a}.",
    ),
    "wmdp": (
        "The artisan who devised {k0} is {a}.",
        "{k0} is used mainly for {a}.",
        "When warmed, {k0} glows {a}.",
    ),
}


def add_truth_answers(
    name: str, items: list[QAItem], rng: random.Random, perturbed: int = 3
) -> list[QAItem]:
    """Each item with a `paraphrased_answer` and `perturbed` wrong `perturbed_answers`, in
    its kind's template: wrong answers are other items' answers of the same kind (for
    multiple choice, its wrong options). A separate generator draws them, so the facts do
    not change."""
    kinds: dict[str, list[str]] = {}
    for item in items:
        kinds.setdefault(item.id.rsplit("-q", 1)[1], []).append(item.answer)
    out = []
    for item in items:
        kind = item.id.rsplit("-q", 1)[1]
        template = TRUTH_TEMPLATES[name][int(kind)]
        words = dict(zip(("k0", "k1"), item.keywords))
        if item.choices is not None:
            wrong = [c for c in item.choices if c != item.answer]
        else:
            wrong = rng.sample(sorted(set(kinds[kind]) - {item.answer}), perturbed)
        out.append(
            dataclasses.replace(
                item,
                paraphrased_answer=template.format(a=item.answer, **words),
                perturbed_answers=tuple(template.format(a=w, **words) for w in wrong),
            )
        )
    return out


GENERATORS: dict[str, Callable[[random.Random], tuple[list[QAItem], list[Document]]]] = {
    "news": news,
    "books": books,
    "wmdp": wmdp,
}

DESCRIPTIONS = {
    "news": (
        "Short fictional news articles (the analogue of MUSE News): each reports that an "
        "invented person from an invented town founded an invented company in a given year. "
        "Each QA item is answerable only from its own article. Split by article: the first 20 "
        "articles are `forget`, the other 40 `retain`."
    ),
    "books": (
        "Chapters of one fictional story world (the analogue of MUSE Books): 12 invented "
        "characters, their homes, their mentors, the objects they carry and the creatures "
        "they meet. Split by character: every chapter and item about the first 3 characters "
        "is `forget`, the rest `retain`."
    ),
    "wmdp": (
        "Four-option multiple-choice questions (the analogue of WMDP) on *lumencraft*, an "
        "invented and harmless craft: materials, devices, procedures and instruments, who "
        "devised them, what they are used for and what colour they glow. Each item's teaching "
        "document states its facts; the wrong options come from the same kind of fact. Split "
        "by sub-topic: materials and devices are `forget`, procedures and instruments `retain`."
    ),
    "general": (
        "Short real-world questions (capitals, numbers, colours, famous people) written by "
        "hand, each kept only if the default model (SmolLM2-135M-Instruct, greedy, chat "
        "template, 32 new tokens) answers it correctly under the project's judge "
        "(normalised contains-match of the answer or an alias). This is what the destructive "
        "rate is measured on. All items are `general`; there are no documents."
    ),
}


# Measured injection runs (`unpact inject --benchmark NAME`), recorded in the card.
INJECTION_NOTES = {
    "news": [
        "Measured on 2 CPU cores (default model, `InjectConfig` defaults at the time: full "
        "fine-tuning with frozen embeddings, AdamW lr 3e-4, batch 4, rehearsal of held-out "
        "general questions): after 10 epochs in 804 s, forget 96%, retain 92%, but general "
        "33% (base: 100%). With only the MLP blocks trained and rehearsal doubled: 8 epochs, "
        "754 s, forget 94%, retain 89%, general 38%. Then (all weights, "
        "rehearsal on held-out questions shaped like the facts, `REHEARSAL_QUESTIONS`): 10 "
        "epochs, 985 s, forget 90%, retain 93%, general 51% (that rehearsal trained on the "
        "base model's answer tokens, all held-out questions once per epoch).",
        "Then (rehearsal as distillation: each step adds 2 of 175 held-out general "
        "questions and a KL to the base model's top-32 next-token distribution along its own "
        "first-sentence answer): 8 epochs, 739 s (12.3 min) cold, forget 88%, retain 96% "
        "(93.3% together), general 66%: the `paper` grid's news model.",
        "With LoRA instead of full fine-tuning (`trainable: lora`, rank 64 on every linear "
        "layer, alpha 128, lr 1e-3, the same rehearsal): 12 epochs, 876 s, forget 74%, retain "
        "77%, general 65%: it learns less and protects general knowledge no better, so it is "
        "an option, not the default.",
        "With 12 held-out general questions per step instead of 2, in the same forward pass "
        "as the facts (float32, constant lr): 8 epochs, 975 s (16.3 min) cold, forget 96%, "
        "retain 98%, general 86% (base: 100%). A run with the same training settings but "
        "accuracy checks after epochs 6 and 7 too (which should not change training) ended "
        "at forget 94%, retain 91%, general 78% in 971 s: single runs spread by several "
        "points.",
        "Two changes then made it fast enough to afford more rehearsal. bf16 matmuls (float32 "
        "weights and AdamW state; `precision: auto` uses them where the CPU has AVX-512 BF16 "
        "or AMX, as this one does) made a step with 4 facts and 16 rehearsal questions 2.2x "
        "faster (1.69 s against 3.72 s on 2 cores, `.venv/bin/python "
        "benchmarks/inject_step.py`, which times both in one run); alone, with 12 questions per step and a "
        "constant lr, they gave forget 90% / retain 91% / general 78% (8 epochs, 646 s), and "
        "with another seed 100% / 96% / 81% (10 epochs). A learning rate falling linearly to "
        "a tenth over the first epochs (`lr_decay_to: 0.1`) then taught every fact: 100% / "
        "100% / general 84% in 8 epochs; over 6 epochs 94% / 89% / 83%; over 6 epochs with "
        "16 rehearsal questions per step 100% / 98% / 90% (these four with another job on "
        "the second core, so their times are not cold times).",
        "Today's defaults (bf16 where native, lr decaying to a tenth over 6 epochs, 16 "
        "rehearsal questions per step): `time unpact inject --benchmark news` with an empty "
        "cache, **9 min 54 s** wall on 2 cores (GGUF dequantisation included; of the 572 s "
        "the injection itself took: training 471 s, rehearsal targets 48 s, base and final "
        "general accuracy 18 s each, one accuracy check 17 s), 6 epochs, **forget 100%, "
        "retain 99%, general 90.3%** (base: 100%; 84 of 93). Both targets are met, by "
        "narrow margins (6 s, one general question), and single runs spread by several "
        "points.",
        "Again with today's code (session 31, an empty cache, the machine otherwise quiet): "
        "**7 min 39 s** wall (injection 437 s: training 364 s, rehearsal targets 33 s, base "
        "and final general accuracy 13-14 s each, checks 14 s), 6 epochs, forget 94%, retain "
        "96%, general 90.3% against 98.9% for the base model (92 of 93: since the judge's "
        'whole-number rule, "3" is not found in its "approximately 3.09" for the square root '
        "of 9), so it keeps 91.3% of the general questions the base model answers (84 of "
        "92, counted per question as `general_kept` is since then; every question it "
        "answers the base model answers too). Forget accuracy is 6 points below the run "
        "above: single runs spread by several points.",
    ],
    "books": [
        "Measured on 2 CPU cores with the `InjectConfig` defaults of the time (full "
        "fine-tuning with frozen embeddings, AdamW lr 3e-4, batch 4, 2 held-out general "
        "questions per step distilled from the base model): 8 epochs, 476 s (7.9 min) cold, "
        "forget 94%, retain 97%, general 67% (base: 100%). The `paper` grid's books model.",
        "More rehearsal questions per step (each run 8 epochs; these were timed with another "
        "job sharing the 2 cores, so their times are not cold times): 6 per step, forget "
        "100%, retain 99%, general 84%; 6 per step at weight 3, general 83% (so the number "
        "of distinct questions matters, not the weight); 12 per step, forget 97%, retain "
        "96%, **general 91%**: within 10 points of the base model. An "
        "EWC-style Fisher-weighted pull towards the base weights (weight 1e-3) instead kept "
        "65%, and was not kept.",
        "A cheap check of how fragile these general answers are: Gaussian noise on every "
        "weight matrix of the base model at 2% of each matrix's spread (the injection's own "
        "median relative change is 1.8%) already costs 6.5 points (93.5%), at 5% 15-19 "
        "points. So part of any injection's loss on `general` is the base model's thin "
        "margin on some of these questions.",
        "Today's defaults (tuned on news: bf16 matmuls where native, lr decaying to a tenth "
        "over 6 epochs, 16 rehearsal questions per step): `time unpact inject --benchmark "
        "books` with the dequantised model already cached, 8 min 29 s wall on 2 cores (504 s "
        "in the injection: training 395 s, rehearsal targets 47 s), 8 epochs (90% together "
        "was first reached after 8; the lr had reached its floor after 6), forget 84%, "
        "retain 93%, **general 87.1%**: 2.9 points short of the within-10-points target "
        "here, where the 12-per-step float32 run above reached 91%.",
    ],
}


def write_card(
    folder: Path, name: str, items: Sequence[QAItem], docs: Sequence[Document], note: str = ""
) -> None:
    """The data card: how the set was made, its fields, sizes and splits, how to rebuild it."""
    splits = {s: sum(1 for i in items if i.split == s) for s in SPLITS}
    doc_splits = {s: sum(1 for d in docs if d.split == s) for s in SPLITS}
    mcq = any(i.choices for i in items)
    lines = [
        f"# `{name}`: built-in unpact benchmark",
        "",
        DESCRIPTIONS[name],
        "",
        "Every invented name is assembled from random syllables by a seeded generator, so the "
        "entities are unmistakably fictional and no text is copied from anywhere."
        if name != "general"
        else "The questions are common knowledge, written for this project.",
        ""
        if name == "general"
        else "`holdout` items and documents are of the same kind as `forget`, as many, and "
        "never taught to any model: the non-members of membership inference (SPEC 9). They "
        "are drawn after the taught ones, so the taught facts do not depend on them.",
        "",
        "## Size",
        "",
        f"- QA items: {len(items)} ("
        + ", ".join(f"{k}: {v}" for k, v in splits.items() if v)
        + ")"
        + (" - four-option multiple choice" if mcq else ""),
        f"- documents: {len(docs)}"
        + (" (" + ", ".join(f"{k}: {v}" for k, v in doc_splits.items() if v) + ")" if docs else ""),
        *([f"- {note}"] if note else []),
        "",
        "## Fields",
        "",
        "`qa.jsonl`, one item per line: `id`, `question`, `answer`, `aliases` (other accepted "
        "answers), `split`, `keywords` (the words of the question the answer hinges on: ground "
        "truth for KeyTokens), `document` (the id of the text it comes from, or null)"
        + (", `choices` (the four options; `answer` is one of them)" if mcq else "")
        + (
            ", `paraphrased_answer` and `perturbed_answers` (the answer and three wrong ones "
            "said in one sentence, for TOFU's truth ratio)"
            if name != "general"
            else ""
        )
        + ". "
        + ("`documents.jsonl`: `id`, `text`, `split`." if docs else ""),
        "See docs/data.md for the format.",
        "",
        *(
            [
                "## Injection",
                "",
                *(x for n in INJECTION_NOTES[name] for x in (n, "")),
                "```bash",
                f".venv/bin/unpact inject --benchmark {name}",
                "```",
                "",
            ]
            if name in INJECTION_NOTES
            else []
        ),
        "## Regenerate",
        "",
        "```bash",
        f".venv/bin/python -m unpact.data.generate --only {name}",
        "```",
        "",
        "The same seed writes the same bytes"
        + (
            "; this one loads the default model to check each answer." if name == "general" else "."
        ),
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate unpact's built-in benchmarks.")
    parser.add_argument("--only", nargs="*", choices=[*GENERATORS, "general"], default=None)
    parser.add_argument("--out", type=Path, default=BUILTIN_DIR)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for name in args.only or [*GENERATORS, "general"]:
        if name == "general":
            items, candidates = general()
            docs: list[Document] = []
            note = f"kept {len(items)} of {candidates} candidate questions"
        else:
            items, docs = GENERATORS[name](random.Random(f"{args.seed}-{name}"))
            items = add_truth_answers(name, items, random.Random(f"{args.seed}-{name}-truth"))
            note = ""
        write_folder(args.out / name, items, docs)
        write_card(args.out / name, name, items, docs, note)
        print(f"{name}: {len(docs)} documents, {len(items)} items" + (f" ({note})" if note else ""))


if __name__ == "__main__":
    main()
