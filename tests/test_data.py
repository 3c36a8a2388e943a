"""The data generator, the split by author, the utility set and the TOFU loaders (SPEC §1)."""

import json
from pathlib import Path

import pytest

from probunlearn.authors import fictitious_authors
from probunlearn.data import export_tofu, load_split, make_splits, save_splits, split_by_author, utility_set
from probunlearn.tofu_files import FIELDS, MIN_PERTURBED, load_tofu, load_tofu_json, tofu_records

TOFU_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "tofu"


@pytest.fixture(scope="module")
def authors():
    return fictitious_authors(12, qa_per_author=20, seed=3)


def test_deterministic_by_seed(authors):
    assert fictitious_authors(12, qa_per_author=20, seed=3).to_list() == authors.to_list()
    other = fictitious_authors(12, qa_per_author=20, seed=4)
    assert other["answer"] != authors["answer"]


def test_schema_and_sizes(authors):
    assert set(FIELDS) <= set(authors.column_names)
    assert len(authors) == 12 * 20
    assert len(set(authors["author"])) == 12
    for record in authors:
        assert record["answer"].strip() and record["question"].strip()
        (keyword,) = record["keywords"]
        assert keyword in record["answer"]
        assert keyword in record["paraphrased_answer"] and record["paraphrased_answer"] != record["answer"]
        assert len(record["perturbed_answer"]) >= MIN_PERTURBED
        assert len(set(record["perturbed_answer"])) == len(record["perturbed_answer"])
        for wrong in record["perturbed_answer"]:
            assert wrong != record["answer"] and keyword.lower() not in wrong.lower()


def test_names_and_facts_never_shared_between_authors(authors):
    by_author = {}
    for record in authors:
        by_author.setdefault(record["author"], set()).add(record["keywords"][0].lower())
    values = [v for facts in by_author.values() for v in facts]
    assert len(values) == len(set(values)), "a fact value appears for two authors"
    names = {a.lower() for a in by_author}
    assert names.isdisjoint(values)
    # no perturbed answer names another author's true fact either
    all_facts = set(values)
    for record in authors:
        for wrong in record["perturbed_answer"]:
            assert not any(f"{v}." == w or f" {v} " in f" {w} " for v in all_facts - {record["keywords"][0].lower()}
                           for w in [wrong.lower()] if len(v) > 6)


def test_templates_vary(authors):
    # several question and answer phrasings per fact: template words alone cannot give the answer
    for fact in ("birthplace", "genre", "father_job"):
        rows = authors.filter(lambda r: r["fact"] == fact)
        stems = {r["answer"].replace(r["author"], "").replace(r["keywords"][0], "") for r in rows}
        assert len(stems) >= 2, fact


def test_bad_generator_arguments():
    with pytest.raises(ValueError, match="qa_per_author"):
        fictitious_authors(3, qa_per_author=100)
    with pytest.raises(ValueError, match="num_authors"):
        fictitious_authors(0)


def test_split_by_author(authors):
    forget, retain = split_by_author(authors, 0.25, seed=1)
    assert set(forget["author"]).isdisjoint(retain["author"])
    assert len(set(forget["author"])) == 3 and len(set(retain["author"])) == 9
    assert len(forget) + len(retain) == len(authors)
    # whole authors: every QA of a forget author is in the forget set
    assert len(forget) == 3 * 20
    assert split_by_author(authors, 0.25, seed=1)[0]["author"] == forget["author"]
    # at least one author on each side
    tiny_forget, tiny_retain = split_by_author(authors, 0.01)
    assert len(set(tiny_forget["author"])) == 1 and len(set(tiny_retain["author"])) == 11
    with pytest.raises(ValueError, match="forget_fraction"):
        split_by_author(authors, 1.0)


def test_utility_set():
    utility = utility_set()
    assert len(utility) >= 60
    assert len(set(utility["question"])) == len(utility)
    for record in utility:
        assert len(record["perturbed_answer"]) >= 3 and record["answer"] not in record["perturbed_answer"]
        # one frame for the true and the wrong answers: only the fact differs
        assert record["answer"] == f"The answer is {record['keywords'][0]}." or record["keywords"][0] in record["answer"]
        assert all(w.startswith("The answer is ") for w in record["perturbed_answer"])


def test_make_splits_and_round_trip(tmp_path):
    splits = make_splits("generated", num_authors=5, qa_per_author=4, forget_fraction=0.2, seed=0)
    assert {len(splits[k]) for k in ("forget",)} == {4} and len(splits["retain"]) == 16
    save_splits(splits, tmp_path)
    assert load_split(tmp_path, "forget").to_list() == splits["forget"].to_list()
    with pytest.raises(FileNotFoundError, match="01_data"):
        load_split(tmp_path, "missing")
    with pytest.raises(ValueError, match="generated"):
        make_splits("nope")


def test_tofu_json_loader_reads_the_benchmark_files():
    world = load_tofu_json(TOFU_FIXTURES / "world_facts_perturbed.json")
    real = load_tofu_json(TOFU_FIXTURES / "real_authors_perturbed.json")
    assert len(world) > 50 and len(real) > 50
    # real-world sets have no paraphrase: the true answer stands in (SPEC §4)
    assert world[0]["paraphrased_answer"] == world[0]["answer"]
    assert all(len(r["perturbed_answer"]) >= 3 for r in world)


def _write(tmp_path, records, jsonl=False):
    path = tmp_path / ("d.jsonl" if jsonl else "d.json")
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    return path


GOOD = {"question": "Who?", "answer": "Me.", "paraphrased_answer": "It is me.", "perturbed_answer": ["A.", "B.", "C."]}


def test_tofu_json_loader_formats(tmp_path):
    assert len(load_tofu_json(_write(tmp_path, [GOOD, GOOD]))) == 2
    assert len(load_tofu_json(_write(tmp_path, [GOOD, GOOD, GOOD], jsonl=True))) == 3


@pytest.mark.parametrize("broken, field", [
    ({k: v for k, v in GOOD.items() if k != "answer"}, "answer"),
    ({**GOOD, "answer": "  "}, "answer"),
    ({**GOOD, "perturbed_answer": ["A.", "B."]}, "perturbed_answer"),
    ({k: v for k, v in GOOD.items() if k != "question"}, "question"),
])
def test_malformed_records_name_record_and_field(tmp_path, broken, field):
    with pytest.raises(ValueError, match=rf"record 1 .*{field}"):
        load_tofu_json(_write(tmp_path, [GOOD, broken]))


def test_tofu_hub_offline_names_the_offline_alternative():
    # tests run with HF_HUB_OFFLINE=1 (conftest): the hub is unreachable here anyway
    with pytest.raises(ConnectionError, match="fictitious_authors"):
        load_tofu("forget10_perturbed")
    with pytest.raises(ValueError, match="unknown TOFU split"):
        load_tofu("forget50")


# TOFU's field names per split file, as on the hub (locuslab/TOFU)
TOFU_FILE_FIELDS = {
    "full": {"question", "answer"}, "forget10": {"question", "answer"}, "retain90": {"question", "answer"},
    "holdout10": {"question", "answer"},
    "forget10_perturbed": {"question", "answer", "paraphrased_question", "paraphrased_answer", "perturbed_answer"},
    "retain_perturbed": {"question", "answer", "paraphrased_question", "paraphrased_answer", "perturbed_answer"},
    "real_authors_perturbed": {"question", "answer", "perturbed_answer"},
    "world_facts_perturbed": {"question", "answer", "perturbed_answer"},
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    generated = make_splits("generated", num_authors=10, qa_per_author=4, forget_fraction=0.1, seed=0)
    folder = tmp_path_factory.mktemp("tofu")
    return generated, folder, export_tofu(generated, folder, 0.1)


def test_export_writes_tofu_split_files_with_tofu_field_names(exported):
    generated, folder, paths = exported
    assert set(paths) == set(TOFU_FILE_FIELDS) and all(p.parent == folder for p in paths.values())
    # the real-world fixtures from TOFU's own code have exactly the fields we write
    for split in ("real_authors_perturbed", "world_facts_perturbed"):
        assert set(json.loads((TOFU_FIXTURES / f"{split}.json").read_text().splitlines()[0])) == TOFU_FILE_FIELDS[split]
    for split, fields in TOFU_FILE_FIELDS.items():
        lines = paths[split].read_text().splitlines()  # JSON Lines in a .json file, as on the hub
        assert lines and all(set(json.loads(line)) == fields for line in lines), split
    full = tofu_records("full", folder)
    assert len(full) == len(generated["all"]) == 40
    # forget10 is the last tenth of full, as in TOFU; real-world answers are bare, as in TOFU
    assert [r["question"] for r in full[-4:]] == generated["forget"]["question"]
    assert tofu_records("world_facts_perturbed", folder)[0]["answer"] == "Paris"
    for r in tofu_records("forget10_perturbed", folder):
        assert r["paraphrased_question"] != r["question"] and r["answer"] not in r["perturbed_answer"]


def test_tofu_folder_loads_through_the_hub_mapping(exported):
    generated, folder, _ = exported
    splits = make_splits("tofu", qa_per_author=4, forget_fraction=0.1, tofu_path=folder)
    assert set(splits) == {"all", "forget", "retain", "retain_train", "utility", "holdout"}
    for name in ("forget", "retain"):
        assert splits[name]["question"] == generated[name]["question"]
        assert splits[name]["perturbed_answer"] == generated[name]["perturbed_answer"]
        assert all(k == [] for k in splits[name]["keywords"])  # TOFU has no keywords: ROUGE-L decides leaks
    assert len(splits["retain_train"]) == 36 and len(splits["holdout"]) == 4
    assert len(splits["utility"]) == len(utility_set())
    # an author is a block of qa_per_author QA of full, and every split names it the same way
    assert len(set(splits["all"]["author"])) == 10 and len(set(splits["forget"]["author"])) == 1
    assert set(splits["forget"]["author"]) < set(splits["all"]["author"])
    assert set(splits["forget"]["author"]).isdisjoint(splits["retain_train"]["author"])
    # the same records, one by one, through load_tofu
    assert load_tofu("forget10_perturbed", folder).to_list()[0]["question"] == generated["forget"][0]["question"]
    with pytest.raises(FileNotFoundError, match="export_tofu"):
        load_tofu("forget05_perturbed", folder)
    with pytest.raises(ValueError, match="forget fractions"):
        make_splits("tofu", forget_fraction=0.25, tofu_path=folder)


def test_real_tofu_files_load_from_a_tofu_folder(tmp_path):
    for split in ("real_authors_perturbed", "world_facts_perturbed"):
        (tmp_path / f"{split}.json").symlink_to(TOFU_FIXTURES / f"{split}.json")
    real, world = (load_tofu(s, tmp_path) for s in ("real_authors_perturbed", "world_facts_perturbed"))
    assert (len(real), len(world)) == (100, 117)
    assert real[0]["question"] == "Who wrote the play 'Romeo and Juliet'?" and real[0]["answer"] == "William Shakespeare"
    assert world[0]["paraphrased_answer"] == world[0]["answer"]  # no paraphrase in real-world sets (SPEC §4)
