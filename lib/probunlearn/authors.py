"""A seeded generator of fictitious authors in the TOFU schema (SPEC §1): names, places and titles
invented from syllables, so that no pretrained model can know them, and facts about each author with
a paraphrased and perturbed (wrong) answers; plus the holdout authors that membership inference
needs (non-members that share no fact with any member).
"""

from __future__ import annotations

import random
from typing import Callable, Iterable

from probunlearn.tofu_files import MIN_PERTURBED

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


def paraphrased_question(record: dict) -> str:
    """Another question template of the record's fact, with the same author (TOFU's
    `paraphrased_question`); the question itself when the fact has one template."""
    templates = [fact["q"] for fact in _FACTS if fact["key"] == record["fact"]][0]
    asked = [t.format(n=record["author"]) for t in templates]
    return asked[(asked.index(record["question"]) + 1) % len(asked)]
