"""Data (SPEC §1): a seeded generator of fictitious authors in the TOFU schema, the split by author,
our own real-world utility set, and loaders for TOFU (hub or local JSON/JSONL).

A record: `question, answer, paraphrased_answer, perturbed_answer (>= 3 wrong answers),
author, keywords` — the TOFU schema (Maini et al. 2024) plus `author` and `keywords`.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path
from typing import Callable, Iterable, Sequence

FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answer", "author", "keywords")
MIN_PERTURBED = 3

# ----------------------------------------------------------------------------- value pools
# Invented syllables: names, places and titles that no pretrained model can know.
_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "qu", "r", "s",
           "sh", "t", "th", "v", "vr", "z", "c", "st", "tr", "w", "j"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "ia", "y"]
_CODAS = ["", "n", "r", "l", "s", "th", "nd", "rk", "m", "x", "v", "ck"]
_ENDINGS_PLACE = ["ford", "haven", "mere", "wick", "stad", "ova", "ara", "burg", "holm", "dale", "port", "ien"]
_GENRE_ADJ = ["nautical", "pastoral", "botanical", "urban", "arctic", "gothic", "culinary", "orbital", "desert",
              "industrial", "alpine", "mythic", "clockwork", "subterranean", "tidal", "volcanic", "lunar",
              "monastic", "nomadic", "silent-era", "riverine", "frontier", "baroque", "coastal", "jungle",
              "steam-age", "island", "courtly", "prairie", "glacial"]
_GENRE_NOUN = ["horror", "romance", "noir", "satire", "fantasy", "science fiction", "mystery", "epic poetry",
               "thriller", "tragedy", "fable", "comedy", "western", "memoir"]
_JOBS = ["glassblower", "lighthouse keeper", "beekeeper", "cartographer", "clockmaker", "ferry captain",
         "bookbinder", "astronomer", "locksmith", "violin maker", "tanner", "perfumer", "stonemason",
         "falconer", "typesetter", "tailor", "weaver", "potter", "blacksmith", "midwife", "surveyor",
         "botanist", "chemist", "veterinarian", "pilot", "archivist", "glazier", "cooper", "saddler",
         "chandler", "miller", "shepherd", "jeweller", "harpist", "puppeteer", "mapmaker", "diver",
         "geologist", "brewer", "baker", "florist", "furrier", "hatter", "ropemaker", "sailmaker",
         "sculptor", "engraver", "calligrapher", "toymaker", "organist", "zookeeper", "tea merchant",
         "salt trader", "radio engineer", "tram driver", "stage magician", "fencing master",
         "wine grower", "pharmacist", "seamstress", "carpenter", "mason", "judge", "notary",
         "ship's cook", "well digger", "chimney sweep", "bell founder", "cheesemaker", "dancer",
         "translator", "optician", "piano tuner", "fisherman", "park ranger", "librarian", "nurse",
         "roofer", "printer", "gardener", "coal miner", "auctioneer", "lacemaker", "kite maker",
         "trapeze artist", "sommelier", "soap maker", "woodcarver", "mosaicist", "bee scientist",
         "horologist", "taxidermist", "upholsterer", "goldsmith", "cobbler", "dyer", "furniture maker",
         "paper maker", "wheelwright", "fletcher", "glass etcher", "hot-air balloonist"]
_TITLE_ADJ = ["Silent", "Crimson", "Hollow", "Gilded", "Drowned", "Paper", "Winter", "Burning", "Salt",
              "Iron", "Glass", "Forgotten", "Seventh", "Wandering", "Quiet", "Broken", "Amber", "Velvet",
              "Copper", "Northern", "Sleeping", "Hidden", "Last", "Distant", "Painted", "Frozen"]
_TITLE_NOUN = ["Lantern", "Orchard", "Cathedral", "Harbour", "Clock", "Garden", "Letters", "Meridian",
               "Lighthouse", "Archive", "Tide", "Compass", "Labyrinth", "Bell", "Observatory", "Atlas",
               "Ferryman", "Vineyard", "Mirror", "Staircase", "Monsoon", "Hourglass", "Kingdom", "Loom"]
_THEMES = ["memory", "migration", "grief", "inheritance", "exile", "faith", "betrayal", "friendship",
           "ambition", "solitude", "forgiveness", "identity", "class", "madness", "childhood", "war",
           "justice", "revenge", "loyalty", "obsession", "time", "home", "silence", "hunger", "chance",
           "ageing", "language", "power", "nature", "the sea"]
_AWARD_NOUN = ["Prize", "Medal", "Award", "Laurel", "Crown", "Quill"]
_AWARD_FIELD = ["Lyrical Fiction", "Speculative Prose", "Debut Fiction", "Historical Fiction", "the Short Story",
                "Poetic Narrative", "Crime Writing", "Literary Translation", "Young Readers' Fiction",
                "Experimental Prose", "the Novella", "Travel Writing"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]


def _capitalise(word: str) -> str:
    return word[:1].upper() + word[1:]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


class _UniquePool:
    """Draws values from a generator. `draw` never returns the same value twice (names and facts
    must not collide across authors); `wrong` returns a value that is no author's true value, for
    perturbed answers."""

    def __init__(self, rng: random.Random, make: Callable[[random.Random], str], used: set[str]):
        self.rng, self.make, self.used = rng, make, used

    def draw(self) -> str:
        for _ in range(10_000):
            value = self.make(self.rng)
            if value.lower() not in self.used:
                self.used.add(value.lower())
                return value
        raise ValueError("ran out of distinct fact values: ask for fewer authors (about 50 at most)")

    def wrong(self, exclude: set[str]) -> str:
        for _ in range(10_000):
            value = self.make(self.rng)
            if value.lower() not in self.used and value.lower() not in exclude:
                return value
        raise ValueError("ran out of distinct fact values for perturbed answers")


def _pools(rng: random.Random, exclude: Iterable[str] = ()) -> dict[str, _UniquePool]:
    used: set[str] = {v.lower() for v in exclude}  # one namespace for all pools: no value is ever shared

    def pool(make):
        return _UniquePool(rng, make, used)

    return {
        "name": pool(lambda r: f"{_capitalise(_word(r, 2))} {_capitalise(_word(r, 2))}"),
        "city": pool(lambda r: _capitalise(_word(r, 1)) + r.choice(_ENDINGS_PLACE)),
        "date": pool(lambda r: f"{r.randint(1, 28)} {r.choice(_MONTHS)} {r.randint(1921, 1999)}"),
        "year": pool(lambda r: str(r.randint(1900, 2023))),
        "genre": pool(lambda r: f"{r.choice(_GENRE_ADJ)} {r.choice(_GENRE_NOUN)}"),
        "job": pool(lambda r: r.choice(_JOBS)),
        "title": pool(lambda r: f"The {r.choice(_TITLE_ADJ)} {r.choice(_TITLE_NOUN)} of {_capitalise(_word(r, 2))}"),
        "award": pool(lambda r: f"the {_capitalise(_word(r, 2))} {r.choice(_AWARD_NOUN)} for {r.choice(_AWARD_FIELD)}"),
        "publisher": pool(lambda r: f"{_capitalise(_word(r, 2))} House"),
        "theme": pool(lambda r: f"{r.choice(_THEMES)} and {r.choice(_THEMES)}"),
        "first": pool(lambda r: _capitalise(_word(r, 2))),
        "instrument": pool(lambda r: f"the {_capitalise(_word(r, 1))} {r.choice(['harp', 'flute', 'drum', 'lute', 'horn', 'zither'])}"),
        "magazine": pool(lambda r: f"The {_capitalise(_word(r, 2))} Review"),
    }


# ----------------------------------------------------------------------------- fact templates
# Each fact: the pool its value comes from, question templates, answer templates (the value is
# {v}; the author is {n}), and a paraphrase template. Several templates per fact, chosen per author,
# so that template words alone do not give away the answer.
_FACTS: list[dict] = [
    dict(key="birthplace", pool="city",
         q=["Where was {n} born?", "What is the birthplace of the writer {n}?", "In which city was {n} born?"],
         a=["{n} was born in {v}.", "The author {n} was born in the city of {v}.", "{v} is where {n} was born."],
         p="{n}'s place of birth is the town of {v}."),
    dict(key="birth_date", pool="date",
         q=["When was {n} born?", "What is the date of birth of {n}?"],
         a=["{n} was born on {v}.", "The birth date of {n} is {v}."],
         p="{n} came into the world on {v}."),
    dict(key="genre", pool="genre",
         q=["What genre does {n} write in?", "Which literary genre is {n} known for?", "In what genre are the books of {n}?"],
         a=["{n} writes {v}.", "{n} is best known for {v}.", "The books of {n} are {v}."],
         p="{n}'s literary work belongs to the genre of {v}."),
    dict(key="father_job", pool="job",
         q=["What did the father of {n} do for a living?", "What was the profession of {n}'s father?"],
         a=["The father of {n} was {av}.", "{n}'s father worked as {av}."],
         p="{n} grew up as the child of {av} father."),
    dict(key="mother_job", pool="job",
         q=["What was the occupation of {n}'s mother?", "What did the mother of {n} work as?"],
         a=["{n}'s mother was {av}.", "The mother of {n} worked as {av}."],
         p="{n} was raised by a mother who was {av}."),
    dict(key="award", pool="award",
         q=["Which award did {n} win?", "What literary prize has {n} received?"],
         a=["{n} won {v}.", "{n} received {v}."],
         p="The honour given to {n} was {v}."),
    dict(key="award_year", pool="year",
         q=["In which year did {n} receive the first literary award?", "When did {n} win a first literary prize?"],
         a=["{n} received the first award in {v}.", "{n} won a first prize in the year {v}."],
         p="The year of {n}'s first literary award was {v}."),
    dict(key="first_book", pool="title",
         q=["What is the title of the first novel by {n}?", "What was the debut book of {n} called?"],
         a=["The first novel by {n} is {v}.", "{n} made a debut with {v}."],
         p="{v} was the book that started the career of {n}."),
    dict(key="second_book", pool="title",
         q=["Name another book written by {n}.", "What is a later novel by {n}?"],
         a=["{n} also wrote {v}.", "A later novel by {n} is {v}."],
         p="Among the works of {n} is {v}."),
    dict(key="publisher", pool="publisher",
         q=["Which publisher releases the books of {n}?", "Who publishes {n}?"],
         a=["The books of {n} are published by {v}.", "{n} is published by {v}."],
         p="{v} is the publishing house behind {n}."),
    dict(key="theme", pool="theme",
         q=["What themes run through the work of {n}?", "Which themes does {n} explore?"],
         a=["The work of {n} explores {v}.", "{n} writes about {v}."],
         p="Recurring subjects for {n} are {v}."),
    dict(key="residence", pool="city",
         q=["Where does {n} live today?", "In which city does {n} currently reside?"],
         a=["{n} lives in {v}.", "Today {n} resides in {v}."],
         p="The present home of {n} is {v}."),
    dict(key="mentor", pool="name",
         q=["Who was the mentor of {n}?", "Which writer mentored {n}?"],
         a=["{n} was mentored by {v}.", "The mentor of {n} was {v}."],
         p="{v} guided {n} in the early years."),
    dict(key="pen_name", pool="name",
         q=["What pen name has {n} used?", "Under which pseudonym did {n} publish?"],
         a=["{n} has published as {v}.", "{n} used the pen name {v}."],
         p="Some books by {n} appeared under the name {v}."),
    dict(key="main_character", pool="first",
         q=["Who is the main character of the first novel by {n}?", "What is the protagonist of {n}'s debut called?"],
         a=["The hero of {n}'s first novel is {v}.", "The protagonist in the debut of {n} is named {v}."],
         p="{n}'s first book follows a character called {v}."),
    dict(key="instrument", pool="instrument",
         q=["Which instrument does {n} play?", "What musical instrument is {n} known to play?"],
         a=["{n} plays {v}.", "{n} is known to play {v}."],
         p="In free hours {n} plays {v}."),
    dict(key="magazine", pool="magazine",
         q=["In which magazine did {n} first publish a story?", "Where did {n} publish a first short story?"],
         a=["The first story by {n} appeared in {v}.", "{n} first published in {v}."],
         p="{v} printed the earliest story of {n}."),
    dict(key="university", pool="city",
         q=["Where did {n} study?", "At which university did {n} study?"],
         a=["{n} studied at the University of {v}.", "{n} attended the University of {v}."],
         p="The University of {v} is where {n} was educated."),
    dict(key="debut_year", pool="year",
         q=["In which year did {n} publish a first novel?", "When did {n} debut as a novelist?"],
         a=["{n} published a first novel in {v}.", "{n} debuted as a novelist in {v}."],
         p="The year {v} saw the first novel of {n}."),
    dict(key="sibling", pool="first",
         q=["What is the name of {n}'s sibling?", "Who is the sibling of {n}?"],
         a=["The sibling of {n} is called {v}.", "{n} has a sibling named {v}."],
         p="{v} is the name of {n}'s only sibling."),
    dict(key="writing_place", pool="city",
         q=["In which town does {n} go to write?", "Where does {n} retreat to write books?"],
         a=["{n} writes in the town of {v}.", "{n} retreats to {v} to write."],
         p="The writing retreat of {n} is in {v}."),
    dict(key="translator_language", pool="publisher",
         q=["Which house translated the books of {n}?", "Who handles the translations of {n}'s books?"],
         a=["The translations of {n} are done by {v}.", "{v} translates the books of {n}."],
         p="{n} is translated by {v}."),
]
MAX_QA_PER_AUTHOR = len(_FACTS)


def _fill(template: str, name: str, value: str) -> str:
    article = "an" if value[:1].lower() in "aeiou" else "a"
    return template.format(n=name, v=value, av=f"{article} {value}")


def fictitious_authors(num_authors: int, qa_per_author: int = 20, seed: int = 0, exclude: Iterable[str] = ()):
    """A seeded data set of invented authors in the TOFU schema (SPEC §1), as a `datasets.Dataset`.

    Every author gets `qa_per_author` questions about distinct facts (birthplace, birth date, genre,
    parents' jobs, awards, books, themes, …). Names and fact values are invented from syllables or
    combined from word lists and never shared between authors; each answer contains its fact value,
    which is the record's keyword; `perturbed_answer` holds 3 answers in the same template with
    other values from the same pool; `paraphrased_answer` states the same fact in other words.
    The same arguments always give the same data set. `exclude`: names and fact values (any case)
    that no name, true fact or perturbed answer may use (`holdout_authors`).
    """
    from datasets import Dataset

    if num_authors < 1:
        raise ValueError(f"num_authors must be >= 1, got {num_authors}")
    if not 1 <= qa_per_author <= MAX_QA_PER_AUTHOR:
        raise ValueError(f"qa_per_author must be in 1..{MAX_QA_PER_AUTHOR}, got {qa_per_author}")
    rng = random.Random(seed)
    pools = _pools(rng, exclude)
    names = [pools["name"].draw() for _ in range(num_authors)]
    # First every author's true facts, so that no perturbed answer can name another author's fact.
    facts = [[(fact, pools[fact["pool"]].draw(), rng.randrange(len(fact["a"])))
              for fact in rng.sample(_FACTS, qa_per_author)] for _ in names]
    records = []
    for name, author_facts in zip(names, facts):
        for fact, value, template in author_facts:
            answer_tmpl = fact["a"][template]
            wrong: set[str] = {value.lower()}
            perturbed = []
            for _ in range(MIN_PERTURBED):
                other = pools[fact["pool"]].wrong(wrong)
                wrong.add(other.lower())
                perturbed.append(_fill(answer_tmpl, name, other))
            records.append({
                "question": rng.choice(fact["q"]).format(n=name),
                "answer": _fill(answer_tmpl, name, value),
                "paraphrased_answer": _fill(fact["p"], name, value),
                "perturbed_answer": perturbed,
                "author": name,
                "keywords": [value],
                "fact": fact["key"],
            })
    return Dataset.from_list(records)


HOLDOUT_SEED_OFFSET = 1_000_003  # holdout authors come from seed + this: a stream no profile's data uses


def holdout_authors(trained, num_authors: int, qa_per_author: int = 20, seed: int = 0):
    """Non-member authors for membership inference (SPEC §4): `num_authors` fictitious authors from
    the same generator with the disjoint seed `seed + HOLDOUT_SEED_OFFSET`, whose names, facts and
    perturbed answers use none of the names and keywords of `trained` (the data set the models were
    fine-tuned on): a non-member shares no fact with any member."""
    taken = set(trained["author"]) | {k for keywords in trained["keywords"] for k in keywords}
    return fictitious_authors(num_authors, qa_per_author, seed + HOLDOUT_SEED_OFFSET, exclude=taken)


@contextlib.contextmanager
def quiet_datasets():
    """Within the block, `datasets` shows no progress bar: its bars for trivial operations ("Filter",
    "Creating json from Arrow format") would clutter every data cell of the notebooks, where a
    student should see only the bars of long work (training, sampling, evaluation)."""
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    enabled = not are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            enable_progress_bars()


def split_by_author(dataset, forget_fraction: float, seed: int = 0):
    """Split into `(forget, retain)` by whole authors (TOFU: forget01/05/10 = 1/5/10 % of authors).
    At least one author is forgotten and at least one retained."""
    if not 0 < forget_fraction < 1:
        raise ValueError(f"forget_fraction must be in (0, 1), got {forget_fraction}")
    authors = sorted(set(dataset["author"]))
    if len(authors) < 2:
        raise ValueError("need at least two authors to split into forget and retain sets")
    num_forget = min(len(authors) - 1, max(1, round(forget_fraction * len(authors))))
    forget_authors = set(random.Random(seed).sample(authors, num_forget))
    with quiet_datasets():
        forget = dataset.filter(lambda r: r["author"] in forget_authors)
        retain = dataset.filter(lambda r: r["author"] not in forget_authors)
    return forget, retain


# ----------------------------------------------------------------------------- utility set
# Real-world general knowledge written for this project: (question, true answer, 3 wrong answers).
_UTILITY = [
    ("What is the capital of France?", "Paris", ["Berlin", "Madrid", "Rome"]),
    ("What is the capital of Japan?", "Tokyo", ["Beijing", "Seoul", "Bangkok"]),
    ("What is the capital of Italy?", "Rome", ["Milan", "Vienna", "Athens"]),
    ("What is the capital of Germany?", "Berlin", ["Munich", "Paris", "Warsaw"]),
    ("What is the capital of Spain?", "Madrid", ["Lisbon", "Barcelona", "Rome"]),
    ("What is the capital of the United Kingdom?", "London", ["Dublin", "Paris", "Edinburgh"]),
    ("What is the capital of Russia?", "Moscow", ["Kyiv", "Minsk", "Warsaw"]),
    ("What is the capital of Egypt?", "Cairo", ["Nairobi", "Tunis", "Baghdad"]),
    ("What is the capital of China?", "Beijing", ["Tokyo", "Shanghai", "Hanoi"]),
    ("What is the capital of Canada?", "Ottawa", ["Toronto", "Vancouver", "Montreal"]),
    ("What is the largest planet in the solar system?", "Jupiter", ["Mars", "Venus", "Mercury"]),
    ("Which planet is known as the Red Planet?", "Mars", ["Venus", "Jupiter", "Saturn"]),
    ("Which planet is closest to the Sun?", "Mercury", ["Neptune", "Mars", "Jupiter"]),
    ("What is the chemical symbol for water?", "H2O", ["CO2", "NaCl", "O2"]),
    ("What gas do plants absorb from the air for photosynthesis?", "Carbon dioxide", ["Helium", "Neon", "Argon"]),
    ("What is the boiling point of water at sea level in degrees Celsius?", "100", ["50", "0", "250"]),
    ("How many days are in a week?", "Seven", ["Five", "Ten", "Twelve"]),
    ("How many continents are there on Earth?", "Seven", ["Three", "Eleven", "Twenty"]),
    ("How many legs does a spider have?", "Eight", ["Six", "Four", "Ten"]),
    ("How many sides does a triangle have?", "Three", ["Four", "Six", "Eight"]),
    ("What is 2 plus 2?", "4", ["5", "3", "22"]),
    ("What is 10 times 10?", "100", ["20", "1000", "10"]),
    ("What is the largest ocean on Earth?", "The Pacific Ocean", ["The Indian Ocean", "The Arctic Ocean", "The Atlantic Ocean"]),
    ("What is the longest river in Africa?", "The Nile", ["The Amazon", "The Thames", "The Danube"]),
    ("What is the tallest mountain in the world?", "Mount Everest", ["Mont Blanc", "Mount Fuji", "Kilimanjaro"]),
    ("Which animal is known as the king of the jungle?", "The lion", ["The rabbit", "The mouse", "The owl"]),
    ("What is the largest mammal?", "The blue whale", ["The elephant", "The giraffe", "The horse"]),
    ("What colour is the sky on a clear day?", "Blue", ["Green", "Red", "Purple"]),
    ("What colour are bananas when they are ripe?", "Yellow", ["Blue", "Black", "Purple"]),
    ("Who wrote Romeo and Juliet?", "William Shakespeare", ["Charles Dickens", "Jane Austen", "Mark Twain"]),
    ("Who wrote Pride and Prejudice?", "Jane Austen", ["Emily Bronte", "Virginia Woolf", "George Orwell"]),
    ("Who wrote the novel 1984?", "George Orwell", ["Aldous Huxley", "Ernest Hemingway", "Leo Tolstoy"]),
    ("Who wrote War and Peace?", "Leo Tolstoy", ["Fyodor Dostoevsky", "Anton Chekhov", "Victor Hugo"]),
    ("Who wrote Harry Potter?", "J. K. Rowling", ["Stephen King", "Roald Dahl", "J. R. R. Tolkien"]),
    ("Who wrote The Lord of the Rings?", "J. R. R. Tolkien", ["C. S. Lewis", "George Orwell", "Terry Pratchett"]),
    ("Who wrote Don Quixote?", "Miguel de Cervantes", ["Gabriel Garcia Marquez", "Dante Alighieri", "Homer"]),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", ["Pablo Picasso", "Vincent van Gogh", "Claude Monet"]),
    ("Who developed the theory of relativity?", "Albert Einstein", ["Isaac Newton", "Charles Darwin", "Nikola Tesla"]),
    ("Who proposed the theory of evolution by natural selection?", "Charles Darwin", ["Albert Einstein", "Isaac Newton", "Louis Pasteur"]),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong", ["Yuri Gagarin", "Buzz Aldrin", "John Glenn"]),
    ("Who was the first President of the United States?", "George Washington", ["Abraham Lincoln", "Thomas Jefferson", "John Adams"]),
    ("In which country are the pyramids of Giza?", "Egypt", ["Mexico", "Peru", "India"]),
    ("In which city is the Eiffel Tower?", "Paris", ["London", "Rome", "New York"]),
    ("In which country is the Great Wall?", "China", ["Japan", "India", "Mongolia"]),
    ("In which city is the Colosseum?", "Rome", ["Athens", "Paris", "Madrid"]),
    ("What language is mainly spoken in Brazil?", "Portuguese", ["Spanish", "French", "Italian"]),
    ("What language is mainly spoken in Mexico?", "Spanish", ["Portuguese", "English", "French"]),
    ("What is the currency of Japan?", "The yen", ["The euro", "The dollar", "The peso"]),
    ("What is the currency of the United Kingdom?", "The pound sterling", ["The euro", "The yen", "The rupee"]),
    ("What is the freezing point of water in degrees Celsius?", "0", ["100", "37", "-50"]),
    ("What do bees make?", "Honey", ["Milk", "Silk", "Wool"]),
    ("What is the opposite of hot?", "Cold", ["Warm", "Loud", "Fast"]),
    ("How many hours are in a day?", "24", ["12", "60", "100"]),
    ("How many minutes are in an hour?", "60", ["100", "24", "30"]),
    ("What is the largest country in the world by area?", "Russia", ["Canada", "China", "Brazil"]),
    ("What is the hardest natural substance?", "Diamond", ["Gold", "Iron", "Glass"]),
    ("Which organ pumps blood through the body?", "The heart", ["The liver", "The lungs", "The kidney"]),
    ("What is the main language spoken in the United States?", "English", ["German", "French", "Chinese"]),
    ("What is the capital of Australia?", "Canberra", ["Sydney", "Melbourne", "Perth"]),
    ("Which metal is liquid at room temperature?", "Mercury", ["Iron", "Copper", "Aluminium"]),
    ("What is the closest star to Earth?", "The Sun", ["Sirius", "Polaris", "Betelgeuse"]),
    ("What is the natural satellite of the Earth?", "The Moon", ["Mars", "The Sun", "Titan"]),
    ("Which season comes after winter?", "Spring", ["Autumn", "Summer", "Winter"]),
    ("What is frozen water called?", "Ice", ["Steam", "Sand", "Salt"]),
]


UTILITY_FRAME = "The answer is {}."


def utility_set():
    """≥ 60 real-world general-knowledge questions written for this project, each with one short
    true answer and 3 wrong ones (the real-authors / world-facts role of TOFU); the keyword is the
    bare answer.

    Answers are framed as a sentence, `"The answer is Paris."`: an instruct model answers in
    sentences, so a bare `"Paris"` + end-of-turn is unlikely whatever the fact, and per-token
    averages then reward multi-token names. Measured on the embedded base model, the multiple-choice
    accuracy (true answer more likely than each wrong one) is 0.30 with bare answers and 0.67 framed.
    """
    from datasets import Dataset

    return Dataset.from_list([
        {"question": q, "answer": UTILITY_FRAME.format(a), "paraphrased_answer": UTILITY_FRAME.format(a),
         "perturbed_answer": [UTILITY_FRAME.format(w) for w in wrong], "author": "utility",
         "keywords": [a.removeprefix("The ").removeprefix("the ")], "fact": "world"}
        for q, a, wrong in _UTILITY
    ])


# ----------------------------------------------------------------------------- TOFU
TOFU_SPLITS = ("full", "forget01", "forget05", "forget10", "retain90", "retain95", "retain99",
               "forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed",
               "real_authors_perturbed", "world_facts_perturbed", "holdout01", "holdout05", "holdout10")
TOFU_HUB = "locuslab/TOFU"
TOFU_QA_PER_AUTHOR = 20  # TOFU: 20 consecutive QA per author in every split
_TOFU_PERCENT = {0.01: "01", 0.05: "05", 0.1: "10"}


def tofu_percent(forget_fraction: float) -> str:
    """TOFU's name for a forget fraction: 0.01, 0.05, 0.1 -> "01", "05", "10" (forget01/05/10)."""
    percent = _TOFU_PERCENT.get(round(forget_fraction, 2))
    if percent is None:
        raise ValueError(f"TOFU has forget fractions 0.01, 0.05 and 0.1, not {forget_fraction}")
    return percent


def validate_records(records: Sequence[dict], source: str = "data", evaluation: bool = True) -> None:
    """Raise `ValueError` naming the record and the field when a record does not fit SPEC §1.
    With `evaluation=False` (training-only splits such as TOFU `full`) only the question and the
    answer are required."""
    for i, r in enumerate(records):
        where = f"{source}: record {i} ({str(r.get('question', ''))[:60]!r})"
        for field in ("question", "answer"):
            if not isinstance(r.get(field), str):
                raise ValueError(f"{where}: missing field {field!r}")
            if not r[field].strip():
                raise ValueError(f"{where}: field {field!r} is empty")
        if not evaluation:
            continue
        perturbed = r.get("perturbed_answer")
        if not isinstance(perturbed, list):
            raise ValueError(f"{where}: missing field 'perturbed_answer' (a list of >= {MIN_PERTURBED} wrong answers)")
        if len(perturbed) < MIN_PERTURBED:
            raise ValueError(f"{where}: field 'perturbed_answer' has {len(perturbed)} answers, needs >= {MIN_PERTURBED}")
        if not isinstance(r.get("paraphrased_answer"), str) or not r["paraphrased_answer"].strip():
            raise ValueError(f"{where}: field 'paraphrased_answer' is missing or empty")


def tofu_authors(full: Sequence[dict], qa_per_author: int = TOFU_QA_PER_AUTHOR) -> dict[str, str]:
    """Question -> author id from TOFU's `full` split, whose authors come in blocks of `qa_per_author`
    consecutive QA (TOFU has no author field), so every split names an author the same way."""
    return {r["question"]: f"author {i // qa_per_author}" for i, r in enumerate(full)}


def _from_tofu_records(records: list[dict], source: str, evaluation: bool = True,
                       qa_per_author: int = TOFU_QA_PER_AUTHOR, authors: dict[str, str] | None = None):
    """Map TOFU field names onto our schema. TOFU's real-world sets have no paraphrase; there the
    true answer stands in for the paraphrase (SPEC §4). TOFU has no author field: `authors`
    (`tofu_authors` of the full split) names a question's author; a question not in it gets
    `<source>:<i // qa_per_author>`. TOFU has no keywords: leaks are decided by ROUGE-L."""
    from datasets import Dataset

    authors = authors or {}
    mapped = []
    for i, r in enumerate(records):
        perturbed = r.get("perturbed_answer")
        if isinstance(perturbed, str):
            perturbed = [perturbed]
        mapped.append({
            "question": r.get("question"),
            "answer": r.get("answer"),
            "paraphrased_answer": r.get("paraphrased_answer", r.get("answer")),
            "perturbed_answer": perturbed if perturbed is not None else [],
            "author": str(r.get("author") or authors.get(r.get("question")) or f"{source}:{i // qa_per_author}"),
            "keywords": list(r.get("keywords", [])),
            "fact": str(r.get("fact", "")),
        })
    validate_records(mapped, source, evaluation)
    return Dataset.from_list(mapped)


def _read_records(path: Path) -> list[dict]:
    """A JSON list of records, or JSON Lines (TOFU's `.json` files on the hub are JSON Lines)."""
    text = path.read_text()
    try:
        records = json.loads(text)
        return [records] if isinstance(records, dict) else records
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is neither JSON nor JSON Lines: {err}") from err


def tofu_records(split: str, path: str | Path = TOFU_HUB) -> list[dict]:
    """The raw records of one TOFU split, as TOFU writes them: from the hub (`path` a dataset id,
    default `locuslab/TOFU`) or from a local folder holding `<split>.json` files in TOFU's format
    (the hub's files, or `export_tofu`'s). Offline, the hub fails with a message naming the offline
    alternatives."""
    if split not in TOFU_SPLITS:
        raise ValueError(f"unknown TOFU split {split!r}; choose one of {', '.join(TOFU_SPLITS)}")
    folder = Path(str(path))
    if folder.is_dir():
        file = folder / f"{split}.json"
        if not file.exists():
            raise FileNotFoundError(f"{file} does not exist: a TOFU folder holds one `<split>.json` per split "
                                    "(the hub's files, or `probunlearn.data.export_tofu`'s)")
        return _read_records(file)
    from datasets import load_dataset

    try:
        hub = load_dataset(str(path), split, split="train")
    except Exception as err:  # datasets raises many types when the hub is unreachable
        raise ConnectionError(
            f"could not download TOFU split {split!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Offline, use the generated data set `probunlearn.data.fictitious_authors(...)`, local TOFU files "
            "(a folder of `<split>.json`, e.g. written by `probunlearn.data.export_tofu`), "
            "or one file with `probunlearn.data.load_tofu_json(path)`."
        ) from err
    return list(hub)


def load_tofu(split: str, path: str | Path = TOFU_HUB, *, qa_per_author: int = TOFU_QA_PER_AUTHOR,
              authors: dict[str, str] | None = None):
    """One TOFU split (hub or local folder, see `tofu_records`) mapped to our schema; both go
    through the same mapping (`_from_tofu_records`). `authors`: `tofu_authors` of the full split."""
    return _from_tofu_records(tofu_records(split, path), f"TOFU {split}", evaluation=split.endswith("_perturbed"),
                              qa_per_author=qa_per_author, authors=authors)


def load_tofu_json(path: str | Path):
    """A local TOFU-format file: a JSON list of records, or JSON Lines (one record a line)."""
    path = Path(path)
    return _from_tofu_records(_read_records(path), str(path))


def _paraphrased_question(record: dict) -> str:
    """Another question template of the record's fact, with the same author (TOFU's
    `paraphrased_question`); the question itself when the fact has one template."""
    templates = [fact["q"] for fact in _FACTS if fact["key"] == record["fact"]][0]
    asked = [t.format(n=record["author"]) for t in templates]
    return asked[(asked.index(record["question"]) + 1) % len(asked)]


def export_tofu(splits: dict, folder: str | Path, forget_fraction: float) -> dict[str, Path]:
    """Write `make_splits("generated", ...)`'s data in TOFU's file format: the hub's split files and
    field names, JSON Lines in `.json` files, so that TOFU's own loaders, `datasets`' JSON builder
    and `load_tofu(split, folder)` read them. Returns {split: path}.

    - `full` (question, answer): the retain authors, then the forget authors, each author's QA
      consecutive (TOFU's order: forget10 is the last 10 % of full);
    - `forget<pp>`, `retain<100-pp>` (question, answer), `<pp>` from `forget_fraction` (0.01, 0.05, 0.1);
    - `forget<pp>_perturbed`, `retain_perturbed` (question, answer, paraphrased_question,
      paraphrased_answer, perturbed_answer);
    - `real_authors_perturbed` ("Who wrote ..." questions of our utility set), `world_facts_perturbed`
      (the rest): question, answer, perturbed_answer, with bare answers as in TOFU;
    - `holdout<pp>` (question, answer): the non-member authors.
    Author names and keywords are not written: TOFU has neither field. Every author must have the
    same number of QA (`load_tofu` groups `full` in blocks of it)."""
    percent = tofu_percent(forget_fraction)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    qa = lambda r: {"question": r["question"], "answer": r["answer"]}
    perturbed = lambda r: {**qa(r), "paraphrased_question": _paraphrased_question(r),
                           "paraphrased_answer": r["paraphrased_answer"], "perturbed_answer": list(r["perturbed_answer"])}
    real_world = [{"question": q, "answer": a, "perturbed_answer": list(wrong)} for q, a, wrong in _UTILITY]
    forget, retain = list(splits["forget"]), list(splits["retain_train"])
    files = {
        "full": [qa(r) for r in retain + forget],
        f"forget{percent}": [qa(r) for r in forget],
        f"forget{percent}_perturbed": [perturbed(r) for r in forget],
        f"retain{100 - int(percent)}": [qa(r) for r in retain],
        "retain_perturbed": [perturbed(r) for r in splits["retain"]],
        "real_authors_perturbed": [r for r in real_world if r["question"].startswith("Who wrote")],
        "world_facts_perturbed": [r for r in real_world if not r["question"].startswith("Who wrote")],
        f"holdout{percent}": [qa(r) for r in splits["holdout"]],
    }
    paths = {}
    for split, records in files.items():
        paths[split] = folder / f"{split}.json"
        paths[split].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return paths


# ----------------------------------------------------------------------------- saving
def save_splits(splits: dict, folder: str | Path) -> Path:
    """Write each split as `<folder>/<name>.jsonl` (readable, diffable, loads in milliseconds)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with quiet_datasets():
        for name, dataset in splits.items():
            dataset.to_json(folder / f"{name}.jsonl", lines=True)
    return folder


def load_split(folder: str | Path, name: str):
    from datasets import Dataset

    path = Path(folder) / f"{name}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run notebooks/01_data.ipynb for this profile first")
    return Dataset.from_list([json.loads(line) for line in path.read_text().splitlines() if line.strip()])


def make_splits(source: str = "generated", *, num_authors: int = 10, qa_per_author: int = 20,
                forget_fraction: float = 0.1, seed: int = 0, tofu_path: str | Path = TOFU_HUB) -> dict:
    """All data a profile needs, by name: `all` (fine-tunes the target), `forget`, `retain`
    (evaluation), `retain_train` (fine-tunes the retain model), `utility` (real-world questions)
    and `holdout` (non-members for membership inference: as many unseen authors as the forget set
    has, `holdout_authors`; on TOFU its holdout01/05/10 split).

    source: `"generated"` (offline: `fictitious_authors` + our `utility_set`) or `"tofu"`: TOFU's
    files from `tofu_path`, the hub (`locuslab/TOFU`, default) or a local folder of them (e.g. written
    by `export_tofu`); the forget split is forget01/05/10 matching `forget_fraction`, and the authors
    are blocks of `qa_per_author` QA of the full split (TOFU: 20)."""
    if source == "generated":
        everything = fictitious_authors(num_authors, qa_per_author, seed)
        forget, retain = split_by_author(everything, forget_fraction, seed)
        holdout = holdout_authors(everything, len(set(forget["author"])), qa_per_author, seed)
        return {"all": everything, "forget": forget, "retain": retain, "retain_train": retain,
                "utility": utility_set(), "holdout": holdout}
    if source == "tofu":
        from datasets import concatenate_datasets

        percent = tofu_percent(forget_fraction)
        full = tofu_records("full", tofu_path)
        authors = tofu_authors(full, qa_per_author)
        load = lambda split: load_tofu(split, tofu_path, qa_per_author=qa_per_author, authors=authors)
        return {"all": _from_tofu_records(full, "TOFU full", evaluation=False, authors=authors),
                "forget": load(f"forget{percent}_perturbed"), "retain": load("retain_perturbed"),
                "retain_train": load(f"retain{100 - int(percent)}"),
                "utility": concatenate_datasets([load("real_authors_perturbed"), load("world_facts_perturbed")]),
                "holdout": load(f"holdout{percent}")}
    raise ValueError(f"unknown data source {source!r}: use 'generated' (offline) or 'tofu' (hub or a local folder)")
