"""Data (SPEC §1): every split a profile needs (`make_splits`), from the generated authors
(`authors`) or from TOFU's files (`tofu_files`); the split by author, our own real-world utility set,
and the splits saved as JSONL for the next notebooks.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from probunlearn.authors import fictitious_authors, holdout_authors, paraphrased_question
from probunlearn.tofu_files import TOFU_HUB, from_tofu_records, load_tofu, tofu_authors, tofu_percent, tofu_records
from probunlearn.utils import quiet_datasets


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


# ----------------------------------------------------------------------------- TOFU's file format
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
    perturbed = lambda r: {**qa(r), "paraphrased_question": paraphrased_question(r),
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
        return {"all": from_tofu_records(full, "TOFU full", evaluation=False, authors=authors),
                "forget": load(f"forget{percent}_perturbed"), "retain": load("retain_perturbed"),
                "retain_train": load(f"retain{100 - int(percent)}"),
                "utility": concatenate_datasets([load("real_authors_perturbed"), load("world_facts_perturbed")]),
                "holdout": load(f"holdout{percent}")}
    raise ValueError(f"unknown data source {source!r}: use 'generated' (offline) or 'tofu' (hub or a local folder)")
