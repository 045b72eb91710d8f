"""The item format, its validation, the built-in benchmarks and their generator, the judge."""

from __future__ import annotations

import json
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unpact.data import BUILTIN, load_benchmark, load_folder
from unpact.data.generate import GENERATORS, SEED, main
from unpact.data.items import BUILTIN_DIR, QAItem
from unpact.errors import UnpactError
from unpact.judge import contains_match, is_correct, normalize, rouge_l_recall

GOOD = {
    "id": "x1",
    "question": "Which company did Edda Morvaine found?",
    "answer": "Morvaine Lamps",
    "aliases": [],
    "split": "forget",
    "keywords": ["Edda Morvaine"],
    "document": "d1",
}


@pytest.mark.parametrize(
    ("name", "items", "forget", "retain", "holdout", "documents"),
    [
        ("news", 200, 50, 100, 50, 80),
        ("books", 132, 32, 68, 32, 52),
        ("wmdp", 186, 62, 62, 62, 78),
    ],
)
def test_builtin_round_trip_counts(name, items, forget, retain, holdout, documents):
    bench = load_benchmark(name)
    assert len(bench.items) == items and len(bench.documents) == documents
    assert bench.counts() == {"forget": forget, "retain": retain, "holdout": holdout}
    # as many holdout documents as forget ones (issue 21)
    assert len(bench.documents_of("holdout")) == len(bench.documents_of("forget"))
    docs = {d.id: d for d in bench.documents}
    for item in bench.items:
        assert docs[item.document].split == item.split  # split by document, never mixed
        assert contains_match(docs[item.document].text, [item.answer])  # answerable from it
    assert (BUILTIN_DIR / name / "README.md").is_file()


def test_builtin_sizes_meet_the_spec():
    assert len(load_benchmark("news").documents) >= 60 and len(load_benchmark("news").items) >= 150
    assert (
        len(load_benchmark("books").documents) >= 40 and len(load_benchmark("books").items) >= 100
    )
    wmdp = load_benchmark("wmdp")
    assert len(wmdp.items) >= 100 and all(len(i.choices or ()) == 4 for i in wmdp.items)
    assert len(load_benchmark("general").items) >= 80
    assert set(BUILTIN) == {"news", "books", "wmdp", "general"}


# What the built-in files taught before holdout items and truth-ratio answers existed: the
# injection key hashes exactly this, so cached models and RESULTS.md stay valid (issue 21).
TAUGHT_HASHES = {
    "news": "01dd0714490d57f30053a3689c6259b9549ac1441388f4816d232081440495aa",
    "books": "593a28ab295d9398beb9cea70b5a4f1ecf3e6a891f177e5cfa7a34c4ebf482cb",
    "wmdp": "6a612f7fecbbdb6f6e88dcbd5f10d84cea6e06b15018a17a93625ad08ea70de1",
}


@pytest.mark.parametrize("name", sorted(TAUGHT_HASHES))
def test_taught_facts_and_injection_keys_unchanged_by_holdout_and_answers(name):
    from unpact.inject import _hash_files

    assert _hash_files(sorted((BUILTIN_DIR / name).glob("*.jsonl"))) == TAUGHT_HASHES[name]


@pytest.mark.parametrize("name", sorted(TAUGHT_HASHES))
def test_truth_ratio_answers_are_well_formed(name):
    for item in load_benchmark(name).items:
        assert item.paraphrased_answer and item.answer in item.paraphrased_answer
        wrong = item.perturbed_answers or ()
        assert len(wrong) == 3 and len(set(wrong)) == 3 and item.paraphrased_answer not in wrong
        for w in wrong:  # the same sentence with another answer of the same kind
            prefix = item.paraphrased_answer.split(item.answer)[0]
            assert w.startswith(prefix), (item.id, w)


def test_news_answers_are_unique_to_their_article():
    bench = load_benchmark("news")
    for item in bench.items:
        others = [d for d in bench.documents if d.id != item.document]
        if not item.answer.isdigit():
            assert not any(item.answer in d.text for d in others), item.id


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generator_is_deterministic_and_matches_committed_data(name, tmp_path):
    main(["--only", name, "--out", str(tmp_path / "a")])
    main(["--only", name, "--out", str(tmp_path / "b")])
    for file in ("qa.jsonl", "documents.jsonl", "README.md"):
        a = (tmp_path / "a" / name / file).read_bytes()
        assert a == (tmp_path / "b" / name / file).read_bytes()
        assert a == (BUILTIN_DIR / name / file).read_bytes(), (
            f"{name}/{file} is stale: regenerate it"
        )
    other, _ = GENERATORS[name](random.Random(f"{SEED + 1}-{name}"))
    assert [i.answer for i in other] != [i.answer for i in load_benchmark(name).items]


def write(tmp_path, items, documents=None):
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    if documents is not None:
        (tmp_path / "documents.jsonl").write_text("".join(json.dumps(d) + "\n" for d in documents))
    return tmp_path


DOC = {"id": "d1", "text": "Edda Morvaine founded Morvaine Lamps.", "split": "forget"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"question": None}, "line 2: field 'question' is missing"),
        ({"split": "forgotten"}, "line 2: field 'split' is 'forgotten'"),
        ({"id": "x1"}, "line 2: field 'id': duplicate id 'x1' (first on line 1)"),
        ({"aliases": "Lamps"}, "line 2: field 'aliases' must be a list"),
        ({"keywords": ["Zorblax"]}, "line 2: field 'keywords': 'Zorblax' does not occur"),
        (
            {"choices": ["A", "B", "C"]},
            "line 2: field 'answer' ('Morvaine Lamps') is not one of 'choices'",
        ),
        (  # a letter or an index, as WMDP and MMLU files give the answer: told its text
            {"choices": ["red", "blue", "green"], "answer": "B"},
            "line 2: field 'answer' ('B') is not one of 'choices': give the correct choice's "
            "text (for choice B, 'blue'), not its letter or index",
        ),
        (
            {"choices": ["red", "blue", "green"], "answer": 2},
            "(for choice 2, 'green')",
        ),
        (  # a digit int() refuses: the message itself was a ValueError traceback
            {"choices": ["red", "blue", "green"], "answer": "\u00b2"},
            "line 2: field 'answer' ('\u00b2') is not one of 'choices'",
        ),
        (
            {"choices": ["Morvaine Lamps", "A", "A"]},
            "line 2: field 'choices' holds 'A' twice",
        ),
        ({"document": "nope"}, "line 2: field 'document': no document with id 'nope'"),
        ({"answer": ""}, "line 2: field 'answer' must be a non-empty string"),
        ({"perturbed_answers": []}, "line 2: field 'perturbed_answers' needs at least one"),
        ({"perturbed_answers": "Lamps"}, "line 2: field 'perturbed_answers' must be a list"),
        (
            {"perturbed_answers": ["Morvaine Lamps"]},
            "line 2: field 'perturbed_answers' holds the answer 'Morvaine Lamps' itself",
        ),
        ({"paraphrased_answer": 3.5}, "line 2: field 'paraphrased_answer' must be a non-empty"),
        ({"answer": True}, "line 2: field 'answer' must be a non-empty string or a whole number"),
        # the same question to forget and to keep (once accepted: each split counted both)
        (
            {"split": "retain", "question": " Which company  did Edda Morvaine found?"},
            "line 2: field 'split': the question ' Which company  did Edda Morvaine found?' "
            "is also a forget item (line 1); a question can be in one split only",
        ),
    ],
)
def test_validation_names_file_line_and_field(tmp_path, change, message):
    second = {**GOOD, "id": "x2"}
    for key, value in change.items():
        if value is None:
            del second[key]
        else:
            second[key] = value
    folder = write(tmp_path, [GOOD, second], [DOC])
    with pytest.raises(UnpactError) as err:
        load_folder(folder)
    assert str(err.value).startswith(str(folder / "qa.jsonl"))
    assert message in str(err.value)


def test_a_field_given_twice_in_one_item_is_refused(tmp_path):
    """JSON keeps the last of a field written twice, in silence ("answer" then "answer":
    the first answer lost); a YAML config refuses it, and so does an item now."""
    folder = write(tmp_path, [GOOD], [DOC])
    line = json.dumps(GOOD)
    twice = line[:-1] + ', "answer": "Other Lamps"}'
    (folder / "qa.jsonl").write_text(twice + "\n")
    with pytest.raises(UnpactError, match=r"line 1: field 'answer' given twice"):
        load_folder(folder)


def test_numbered_ids_are_read_as_their_digits(tmp_path):
    """Many exports number their rows ("id": 0) and their documents: refused before, which
    sent the user to rewrite the file. A whole number is read as its digits (so 1 and "1"
    are one id, refused twice); a bool or a fraction is still refused."""
    doc = {**DOC, "id": 7}
    items = [
        {**GOOD, "id": 0, "document": 7},
        {**GOOD, "id": 1, "question": "Who is Edda Morvaine?", "document": None},
    ]
    bench = load_folder(write(tmp_path, items, [doc]))
    assert [i.id for i in bench.items] == ["0", "1"]
    assert bench.items[0].document == "7" and bench.documents[0].id == "7"
    twice = [{**GOOD, "id": 1}, {**GOOD, "id": "1", "question": "Who is Edda Morvaine?"}]
    with pytest.raises(UnpactError, match=r"line 2: field 'id': duplicate id '1'"):
        load_folder(write(tmp_path, twice, [DOC]))
    for bad in (True, 1.5):
        with pytest.raises(UnpactError, match=r"field 'id' must be a non-empty string or a whole"):
            load_folder(write(tmp_path, [{**GOOD, "id": bad}], [DOC]))


def test_answers_written_as_whole_numbers_are_read_as_their_digits(tmp_path):
    """A year or a count written as a JSON number ("answer": 1921) was refused as "must be
    a non-empty string"; so were numeric options. Whole numbers are read as their digits in
    the answer fields (answer, aliases, choices, paraphrased and perturbed answers); the
    question stays text."""
    item = {
        **GOOD,
        "question": "In which year did Edda Morvaine found it?",
        "answer": 1921,
        "aliases": [1921, "nineteen twenty-one"],
        "choices": [1919, 1921, 1923],
        "paraphrased_answer": 1921,
        "perturbed_answers": [1919, 1923],
    }
    (read,) = load_folder(write(tmp_path, [item], [DOC])).items
    assert read.answer == "1921" and read.choices == ("1919", "1921", "1923")
    assert read.aliases == ("1921", "nineteen twenty-one")
    assert (read.paraphrased_answer, read.perturbed_answers) == ("1921", ("1919", "1923"))
    with pytest.raises(UnpactError, match=r"field 'perturbed_answers' holds the answer '1921'"):
        load_folder(write(tmp_path, [{**item, "perturbed_answers": [1921]}], [DOC]))
    with pytest.raises(UnpactError, match=r"field 'question' must be a non-empty string$"):
        load_folder(write(tmp_path, [{**item, "question": 1921}], [DOC]))


def test_validation_of_documents_and_json(tmp_path):
    folder = write(tmp_path, [GOOD], [DOC, {**DOC, "id": "d2", "split": "kept"}])
    with pytest.raises(UnpactError, match=r"documents\.jsonl, line 2: field 'split'"):
        load_folder(folder)
    (tmp_path / "qa.jsonl").write_text('{"id": "x1",\n')
    (tmp_path / "documents.jsonl").write_text(json.dumps(DOC) + "\n")
    with pytest.raises(UnpactError, match=r"qa\.jsonl, line 1: not valid JSON"):
        load_folder(folder)
    with pytest.raises(UnpactError, match=r"has no qa\.jsonl"):
        load_folder(tmp_path / "..")
    with pytest.raises(UnpactError, match="no benchmark 'nope'"):
        load_benchmark("nope")
    with pytest.raises(UnpactError, match=r"^empty benchmark: give a built-in one"):
        load_benchmark(" ")  # it read the current folder


def test_a_valid_user_folder_loads(tmp_path):
    mcq = {
        **GOOD,
        "id": "m1",
        "choices": ["Morvaine Lamps", "Other"],
        "split": "retain",
        "document": None,
    }
    bench = load_folder(write(tmp_path, [GOOD, mcq], [DOC]))
    assert bench.counts() == {"forget": 1, "retain": 1}
    assert bench.items[1].is_mcq and not bench.items[0].is_mcq
    assert bench.items[0].to_dict() == GOOD


def test_judge():
    assert normalize("The Capital, of France!") == "capital of france"
    assert contains_match("The capital of France is Paris.", ["paris"])
    assert not contains_match("Parisian food is good", ["Paris"])  # whole words only
    assert is_correct("A week has seven days.", "7", ["seven"])
    assert not is_correct("A week has six days.", "7", ["seven"])
    assert rouge_l_recall("the glass key of Vorn", "glass key") == 1.0
    assert rouge_l_recall("a key made of glass", "glass key") == 0.5
    assert is_correct("it was the glass key", "the old glass key", judge="rouge")


def test_a_last_a_is_a_letter_not_an_article():
    """ "Vitamin A" normalised to "vitamin", which "Vitamin D" (and "Serie B" for "Serie A",
    "Plan B" for "Plan A") contained: a wrong answer judged correct, forgetting hidden. A
    last word is no article; articles before a noun still do not count."""
    assert contains_match("I'd say Vitamin A, mostly.", ["Vitamin A"])
    assert contains_match("Vitamin A is the one.", ["vitamin a"])
    for wrong, right in (("Vitamin D", "Vitamin A"), ("Serie B", "Serie A"), ("plan b", "Plan A")):
        assert not contains_match(wrong, [right])
    assert contains_match("It is Eiffel Tower.", ["the Eiffel Tower"])
    assert contains_match("It is the Eiffel Tower.", ["Eiffel Tower"])
    assert not contains_match("whatever the answer", ["The"])  # refused by check_answer_room
    # named in the cache keys of a benchmark with such an answer only: every built-in
    # benchmark's cached verdicts and injected models stay valid
    from unpact.judge import ends_in_article

    assert not any(ends_in_article(load_benchmark(b).items) for b in BUILTIN)
    assert ends_in_article([QAItem("v", "Which vitamin?", "retinol", "forget", ("Vitamin A",))])
    assert not ends_in_article([QAItem("t", "Which word?", "The", "forget")])


def test_a_number_is_one_word():
    """ "12,000" was the words 12 and 000, which contained the answer "12"; "3.5" held "3".
    A thousands separator goes, a decimal point stays; a list "1,2,3" is three words."""
    assert not contains_match("It lasted about 12,000 years.", ["12"])
    assert contains_match("It lasted about 12,000 years.", ["12000"])
    assert contains_match("It lasted about 12000 years.", ["12,000"])
    assert not contains_match("It has 3.5 legs.", ["3"])
    assert contains_match("Pi is about 3.14.", ["3.14"]) and contains_match("It has 3 legs.", ["3"])
    assert contains_match("Pick 1,2,3.", ["2"]) and contains_match("In 1921, it closed.", ["1921"])
    # a separator only before a group of exactly three digits: "1,2345" is two numbers
    assert normalize("1,2345") == "1 2345" and normalize("12,000,000") == "12000000"
    assert normalize("Pi is 3.14.") == "pi is 3.14"
    # the decimal point's stand-in, a private-use character, was a "." where a text held it
    assert normalize("v1\ue0002") == "v1 2" and not contains_match("3\ue00014", ["3.14"])
    # which benchmarks' stage keys name the rules (a reference with a digit; one ending in
    # an article): the judge's verdicts on the others are what they were
    from unpact.judge import LAST_WORD_RULE, NUMBER_RULE, judge_rules

    assert judge_rules("contains", load_benchmark("news").items) == {NUMBER_RULE: True}
    assert judge_rules("llm", load_benchmark("news").items) == {}
    assert judge_rules("contains", load_benchmark("books").items) == {}
    vitamin = [QAItem("v", "Which vitamin?", "Vitamin A", "forget")]
    assert judge_rules("contains", vitamin) == {LAST_WORD_RULE: True}
    assert judge_rules("rouge", vitamin) == {}


def test_a_turkish_dotted_i_is_an_i(tmp_path, monkeypatch):
    """ "İ" case-folds to "i" and a combining dot: an English model's "Istanbul" was not the
    answer "İstanbul" (nor "İSTANBUL" the answer "Istanbul"), so a model that knew it was
    judged as not knowing. Only a benchmark with such an answer has the rule in its stage
    and injection keys: every other benchmark's cached verdicts stand."""
    from unpact.judge import DOTTED_I_RULE, judge_rules

    assert contains_match("The city is Istanbul.", ["İstanbul"])
    assert contains_match("İSTANBUL, of course", ["Istanbul"])
    assert contains_match("İzmir", ["İzmir"]) and not contains_match("Izmit", ["İzmir"])
    assert normalize("İstanbul") == "istanbul" == normalize("ISTANBUL")
    assert normalize("Diyarbakır") != normalize("Diyarbakir")  # ı is its own letter
    turkish = [QAItem("t", "Where is the Galata Tower?", "İstanbul", "forget")]
    assert DOTTED_I_RULE in judge_rules("contains", turkish)
    assert DOTTED_I_RULE in judge_rules("rouge", turkish)
    assert judge_rules("llm", turkish) == {}
    for name in ("news", "books", "wmdp", "general"):
        assert DOTTED_I_RULE not in judge_rules("contains", load_benchmark(name).items)
    _injection_keys_rule(tmp_path, monkeypatch, "İstanbul", "has_dotted_i")


def _injection_keys_rule(tmp_path, monkeypatch, answer, met):
    """A benchmark answered `answer` has its injection's key changed by the judge rule
    that `judge.<met>` finds (its stopping rule's judge)."""
    from unpact import judge
    from unpact.inject import InjectConfig, cache_key

    bench = load_folder(write(tmp_path, [{**GOOD, "answer": answer, "keywords": []}]))
    key = cache_key("default", bench, InjectConfig())
    monkeypatch.setattr(judge, met, lambda items: False)
    assert cache_key("default", bench, InjectConfig()) != key


def test_a_keyword_in_another_unicode_form_than_the_question_is_the_questions(tmp_path):
    """A keyword typed with é as e + U+0301 (NFD) and a question with é as one character
    (NFC) look the same, and the item was refused ("'Café Morvaine' does not occur in the
    question"). The keyword is kept in the question's form; where the question mixes
    forms, the message says so."""
    import unicodedata

    nfd = unicodedata.normalize("NFD", "Café Morvaine")
    question = "Who founded the Café Morvaine?"
    bench = load_folder(write(tmp_path, [{**GOOD, "question": question, "keywords": [nfd]}]))
    assert bench.items[0].keywords == ("Café Morvaine",)  # NFC, as the question
    nfd_question = unicodedata.normalize("NFD", question)
    back = load_folder(
        write(tmp_path, [{**GOOD, "question": nfd_question, "keywords": ["Café Morvaine"]}])
    )
    assert back.items[0].keywords == (nfd,)
    mixed = "Who founded the Café " + unicodedata.normalize("NFD", "Café") + "?"
    with pytest.raises(UnpactError, match="different Unicode forms"):
        load_folder(write(tmp_path, [{**GOOD, "question": mixed, "keywords": ["Café Café"]}]))
    with pytest.raises(UnpactError, match=r"'Tea' does not occur in the question$"):
        load_folder(write(tmp_path, [{**GOOD, "question": question, "keywords": ["Tea"]}]))
    # one question in two splits, typed in two forms
    asked = {**GOOD, "question": question, "keywords": []}
    again = {**asked, "id": "x2", "split": "retain", "question": nfd_question}
    with pytest.raises(UnpactError, match="is also a forget item"):
        load_folder(write(tmp_path, [asked, again]))
    # likewise a multiple-choice answer: the choice it is, in the choice's form
    mcq = {**GOOD, "answer": nfd, "choices": ["Café Morvaine", "Tea Room"], "keywords": []}
    assert load_folder(write(tmp_path, [mcq])).items[0].answer == "Café Morvaine"
    with pytest.raises(UnpactError, match="holds 'Café Morvaine' twice"):
        load_folder(write(tmp_path, [{**mcq, "choices": ["Café Morvaine", nfd]}]))
    with pytest.raises(UnpactError, match="holds the answer"):
        load_folder(
            write(tmp_path, [{**GOOD, "answer": nfd, "perturbed_answers": [question[16:-1]]}])
        )


def test_a_digit_of_any_script_is_the_digit_and_arabic_and_hebrew_marks_go(tmp_path, monkeypatch):
    """NFKC leaves Arabic-Indic, Persian and Devanagari digits as they are: a model that
    answered "١٩٤٥" to "1945" (or "1945" to "١٩٤٥") was judged as not knowing it, as was one
    that wrote محمد without the vowel marks of the answer مُحَمَّد. A benchmark whose
    answers go beyond ASCII has the rule in its stage and injection keys (its outputs'
    other digits and marks are judged otherwise); the others' cached verdicts stand."""
    from unpact.judge import NUMBER_RULE, SCRIPT_FOLD_RULE, judge_rules

    assert contains_match("وقعت الحرب عام ١٩٤٥.", ["1945"])
    assert contains_match("It ended in 1945.", ["١٩٤٥"]) and contains_match("۱۹۴۵", ["1945"])
    assert contains_match("१९४७ में", ["1947"]) and not contains_match("१९४७", ["1948"])
    assert not contains_match("١٩٤٥", ["19"])  # still whole numbers
    assert normalize("٣٫٥ و١٢٬٠٠٠") == "3.5 و12000" == normalize("٣٫٥ و12,000")
    assert normalize("１２，０００") == "12000"  # a full-width comma is a comma (NFKC)
    assert contains_match("Il a 12\u202f000 ans.", ["12000"])  # French thousands
    assert contains_match("1\u00a0234\u00a0567", ["1,234,567"])
    assert not contains_match("1\u00a023", ["123"]) and not contains_match("12 000", ["12000"])
    assert contains_match("اسمه محمد", ["مُحَمَّد"]) and contains_match("مُحَمَّد", ["محمد"])
    assert contains_match("مـحـمـد", ["محمد"])  # the tatweel stretches, it is no letter
    assert contains_match("שָׁלוֹם", ["שלום"])
    assert contains_match("پایتخت ايران تهران است", ["ایران"])  # Arabic and Persian yeh
    assert contains_match("كتاب", ["کتاب"]) and contains_match("مصطفى", ["مصطفی"])
    assert not contains_match("ايران", ["ابران"])  # other letters stay other
    # invisible format characters: a copied answer's right-to-left mark, a soft hyphen
    assert contains_match("اسمه محمد", ["\u200fمحمد\u200f"])
    assert contains_match("Vost\u00adrand Glass\u200bworks", ["Vostrand Glassworks"])
    assert normalize("किमी") == "किमी" and normalize("café") == "café"  # other marks stay
    assert normalize("ދިވެހި") == "ދިވެހި"  # Thaana's vowels are no option
    arabic = [QAItem("a", "Who?", "محمد", "forget")]
    assert judge_rules("contains", arabic) == {SCRIPT_FOLD_RULE: True}
    assert judge_rules("llm", arabic) == {}
    assert judge_rules("contains", [QAItem("h", "Year?", "1947 ई.", "forget")]) == {
        NUMBER_RULE: True,
        SCRIPT_FOLD_RULE: True,
    }
    for name in ("news", "books", "wmdp", "general"):
        assert SCRIPT_FOLD_RULE not in judge_rules("contains", load_benchmark(name).items)
    _injection_keys_rule(tmp_path, monkeypatch, "محمد", "folds_scripts")


def test_greek_accents_are_optional(tmp_path, monkeypatch):
    """Greek in capitals drops its tonos: a model that answered "ΑΘΗΝΑ" (or "Αθηνα") to
    "Αθήνα" was judged as not knowing Athens. A Greek letter's accents, breathings and
    diaereses are optional; other letters keep theirs. A benchmark with a Greek answer has
    the rule in its stage and injection keys; the others' cached verdicts stand."""
    from unpact.judge import GREEK_ACCENT_RULE, SCRIPT_FOLD_RULE, judge_rules

    assert contains_match("Η πρωτεύουσα είναι η ΑΘΗΝΑ.", ["Αθήνα"])
    assert contains_match("Αθηνα", ["Αθήνα"]) and contains_match("Αθήνα", ["ΑΘΗΝΑ"])
    assert contains_match("Ἀθῆναι", ["Αθήναι"]) and contains_match("ΠΡΩΤΕΥΟΥΣΑ", ["πρωτεύουσα"])
    assert contains_match("Ο Αγαμέμνων", ["αγαμεμνων"])
    assert not contains_match("Αθήνα", ["Σπάρτη"])  # other letters stay other
    assert normalize("café ΐ") == "café ι" and normalize("Ελλάς") == "ελλασ"
    greek = [QAItem("g", "Capital?", "Αθήνα", "forget")]
    assert judge_rules("contains", greek) == {SCRIPT_FOLD_RULE: True, GREEK_ACCENT_RULE: True}
    assert judge_rules("llm", greek) == {}
    for name in ("news", "books", "wmdp", "general"):
        assert GREEK_ACCENT_RULE not in judge_rules("rouge", load_benchmark(name).items)
    _injection_keys_rule(tmp_path, monkeypatch, "Αθήνα", "has_greek")


def test_a_words_closing_plus_or_hash_is_kept_where_the_answer_has_one(tmp_path, monkeypatch):
    """ "C++" was "c" once its punctuation went: a model answering "C", "C#" or "Objective-C"
    was judged to know it (and "C#" was "C"). Where an accepted answer has a word ending in
    + or #, both texts keep them ("C++11" is "c++ 11"); every other answer is judged as
    before (SPEC section 4), so a benchmark without one keeps its keys and cached verdicts,
    and one with one has the rule in its stage and injection keys."""
    from unpact.judge import SYMBOL_SUFFIX_RULE, has_symbol_suffix, judge_rules

    for wrong in ("It is written in C.", "Objective-C", "C#", "C ++", "c+"):
        assert not contains_match(wrong, ["C++"]), wrong
        assert not is_correct(wrong, "C++", judge="rouge"), wrong
    for right in ("It is written in C++.", "C++11 and C++17", "a C++ compiler", "ｃ＋＋"):
        assert contains_match(right, ["C++"]), right
        assert is_correct(right, "C++", judge="rouge"), right
    assert contains_match("Written in C#/.NET", ["C#"]) and not contains_match("C", ["C#"])
    assert contains_match("It was Notepad++!", ["Notepad++"])
    assert contains_match("Written in C++", ["C"])  # an answer without one: as before
    assert contains_match("1+1 is 2", ["2"]) and contains_match("item #5", ["5"])
    assert normalize("C++ and C#", symbols=True) == "c++ and c#" and normalize("C++") == "c"
    assert not any(map(has_symbol_suffix, ("1+1", "#5", "+44", "a + b", "Paris")))
    items = [QAItem("c", "Which language?", "Python", "forget", aliases=("C++",))]
    assert judge_rules("contains", items) == {SYMBOL_SUFFIX_RULE: True}
    assert judge_rules("llm", items) == {}
    for name in ("news", "books", "wmdp", "general"):
        assert SYMBOL_SUFFIX_RULE not in judge_rules("contains", load_benchmark(name).items)
    _injection_keys_rule(tmp_path, monkeypatch, "C++", "symbol_suffixed")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["C", "++", "#", "+", " ", "1", "the", "x", "-", ".", "ｃ"])))
def test_an_answer_with_plus_or_hash_is_found_in_itself(pieces):
    """Whatever the symbols, an answer's own text holds it, in both word judges."""
    text = "".join(pieces)
    words = set(normalize(text, symbols=True).split()) - {"a", "an", "the"}
    if words:
        assert contains_match(text, [text]) and contains_match(f"It is {text} here", [text])
        assert is_correct(text, text, judge="rouge")


PHRASE = st.lists(
    st.sampled_from(["a", "an", "the", "Tower", "eiffel", "of", "A.", "x"]), max_size=7
)


@settings(max_examples=400, deadline=None)
@given(output=PHRASE, reference=PHRASE)
def test_contains_match_is_the_comparison_of_texts_without_articles(output, reference):
    """SPEC section 4's judge, written out plainly: the reference, articles removed, occurs
    as whole words in the output, articles removed; except that a reference's last word is
    kept, article or not."""
    out, ref = " ".join(output), " ".join(reference)
    last = normalize(ref) == normalize(" ".join(reference[:-1])) if reference else False
    if last and normalize(ref):  # ends in a/an/the: that word is kept
        return
    plain = bool(normalize(ref)) and f" {normalize(ref)} " in f" {normalize(out)} "
    assert contains_match(out, [ref]) == plain


# letters, marks (acute, dot above, diaeresis, fatha), compatibility and format characters
PIECES = [*"aé1,.٣٫ ΑάίΐύςσİiıǰÅ東京-'’\u0301\u0307\u0308\u064e\u200f\ue000\u00a0\u212b"]
UNICODE_TEXT = st.lists(
    st.sampled_from([*PIECES, "the", "ß", "ﬁ", "Ⅳ", "①", "ﾊﾟ", "\u1100\u1161\u11a8"]),
    max_size=12,
).map("".join)


@settings(max_examples=400, deadline=None)
@given(UNICODE_TEXT)
def test_the_word_judges_read_a_text_alike_in_either_unicode_form(text):
    """A text composed (NFC) or decomposed (NFD) is one text to the judges, and holds itself.
    Case folding and the Turkish dot's removal left marks apart: "i̇́" (i, dot, acute) was
    not the "í" it is read as."""
    import unicodedata

    for form in ("NFC", "NFD"):
        assert normalize(unicodedata.normalize(form, text)) == normalize(text)
    if normalize(text).strip() and set(normalize(text).split()) - {"a", "an", "the"}:
        assert contains_match(unicodedata.normalize("NFD", text), [text])
    assert contains_match("Vilnius í", ["i\u0307\u0301"])


def test_a_minimal_item_needs_only_id_question_answer_and_split(tmp_path):
    """`aliases`, `keywords` and `document` were required ("field 'aliases' is missing")
    though each may be empty: a user's first qa.jsonl has four fields."""
    minimal = {
        "id": "m1",
        "question": "Who founded Morvaine Lamps?",
        "answer": "Edda",
        "split": "forget",
    }
    (item,) = load_folder(write(tmp_path, [minimal])).items
    assert (item.aliases, item.keywords, item.document) == ((), (), None)
    full = {**minimal, "aliases": [], "keywords": [], "document": None}
    assert load_folder(write(tmp_path, [full])).items == [item]
    # null for every optional field, as a table's export writes an empty cell (a list's
    # null was refused: "must be a list of non-empty strings")
    nulls = ("aliases", "keywords", "document", "choices", "paraphrased_answer")
    empty = {**minimal, **dict.fromkeys((*nulls, "perturbed_answers"))}
    assert load_folder(write(tmp_path, [empty])).items == [item]

    # saved by an editor that writes a byte-order mark first (Windows Notepad's UTF-8)
    path = tmp_path / "qa.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_folder(tmp_path).items == [item]


def test_verbmem_probes_load_validate_and_survive_materialising(tmp_path):
    """verbmem.jsonl (VerbMem's own probes) is read, validated with file and line, written
    back by write_folder and carried by materialise; a benchmark without probes keeps its
    materialised folder's name (the key it had before probes existed)."""
    from unpact.data.items import Benchmark, VerbatimPrompt, write_folder
    from unpact.data.sources import materialise

    (tmp_path / "b").mkdir()
    folder = write(tmp_path / "b", [GOOD], [DOC])
    probe = {"id": "v1", "prompt": "Edda Morvaine founded", "continuation": " Morvaine Lamps."}
    (folder / "verbmem.jsonl").write_text(json.dumps(probe) + "\n")
    bench = load_folder(folder)
    assert bench.verbatim == [VerbatimPrompt("v1", "Edda Morvaine founded", " Morvaine Lamps.")]
    for bad, message in [
        ({**probe, "id": "v2", "prompt": " "}, "line 2: field 'prompt' must be a non-empty string"),
        ({"id": "v2", "prompt": "p"}, "line 2: field 'continuation' is missing"),
        (probe, "line 2: field 'id': duplicate id 'v1' (first on line 1)"),
    ]:
        (folder / "verbmem.jsonl").write_text(json.dumps(probe) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(UnpactError, match=r"verbmem\.jsonl, " + re.escape(message)):
            load_folder(folder)

    plain = Benchmark("b", bench.items, bench.documents)
    before = materialise(plain, tmp_path / "m")
    with_probes = materialise(
        Benchmark("b", bench.items, bench.documents, None, bench.verbatim), tmp_path / "m"
    )
    assert before.path != with_probes.path and not (before.path / "verbmem.jsonl").exists()
    assert load_folder(with_probes.path).verbatim == bench.verbatim
    write_folder(tmp_path / "w", bench.items, bench.documents, bench.verbatim)
    assert (tmp_path / "w" / "verbmem.jsonl").read_text() == json.dumps(
        {"id": "v1", "prompt": "Edda Morvaine founded", "continuation": " Morvaine Lamps."}
    ) + "\n"


def test_a_question_may_repeat_within_a_split_and_across_splits_with_other_choices(tmp_path):
    """Only one question asked in two splits is refused: within a split it may repeat,
    and multiple-choice items differ by their choices too ('Which of the following...')."""
    mcq = {**GOOD, "choices": ["Morvaine Lamps", "A"], "document": None}
    items = [
        GOOD,
        {**GOOD, "id": "x2", "answer": "Morvaine Glass"},
        {**mcq, "id": "x3"},
        {**mcq, "id": "x4", "split": "retain", "choices": ["Morvaine Lamps", "B"]},
    ]
    assert [i.split for i in load_folder(write(tmp_path, items, [DOC])).items] == [
        "forget",
        "forget",
        "forget",
        "retain",
    ]


def test_a_misspelt_field_is_refused_and_a_users_own_field_ignored(tmp_path):
    """`keyword` for `keywords` was read as no keywords at all (and `perturbed` as no truth
    ratio answers), silently: a field named like one of the format's that the item lacks
    is refused with the name it is close to; other fields are the user's own metadata."""
    for slip, meant in [
        ("keyword", "keywords"),
        ("Keywords", "keywords"),
        ("alias", "aliases"),
        ("perturbed", "perturbed_answers"),
        ("paraphrase", "paraphrased_answer"),
        ("choice", "choices"),
    ]:
        item = {**GOOD, slip: GOOD["keywords"]}
        item.pop(meant, None)
        folder = write(tmp_path, [item], [DOC])
        with pytest.raises(UnpactError) as err:
            load_folder(folder)
        assert f"line 1: field {slip!r} is not in the item format; did you mean {meant!r}?" in str(
            err.value
        )
    # beside the field itself a near name is the user's own (TOFU-like `answers` lists too)
    mine = {**GOOD, "keyword": "x", "source": "wiki", "category": 3, "answers": ["y"]}
    assert load_folder(write(tmp_path, [mine], [DOC])).items[0].to_dict() == GOOD
    doc = {"id": "d1", "txt": DOC["text"], "split": "forget", "origin": "o"}
    folder = write(tmp_path, [GOOD], [doc])
    with pytest.raises(UnpactError, match=r"documents\.jsonl, line 1: field 'txt' .* 'text'\?"):
        load_folder(folder)
    (folder / "documents.jsonl").write_text(json.dumps(DOC) + "\n")
    (folder / "verbmem.jsonl").write_text('{"id": "v", "prompt": "p", "continuations": "c"}\n')
    with pytest.raises(UnpactError, match=r"verbmem\.jsonl, line 1: .* 'continuation'\?"):
        load_folder(folder)


def test_items_in_another_form_are_named_with_how_to_convert_them(tmp_path):
    """A JSON array (a common export) was "not valid JSON (Expecting value)" in qa.jsonl,
    or "expected a JSON object" on one line, and qa.json or qa.csv beside no qa.jsonl was
    only "has no qa.jsonl": now each says what the file is and how to convert it."""
    items = [GOOD, {**GOOD, "id": "x2", "question": "Another question?"}]
    for name, text in (("pretty", json.dumps(items, indent=2)), ("flat", json.dumps(items))):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "qa.jsonl").write_text(text)
        with pytest.raises(UnpactError, match=r"qa\.jsonl, line 1: a JSON array, not JSON lines"):
            load_benchmark(str(folder))
    for exported in ("qa.json", "qa.csv"):
        folder = tmp_path / exported.replace(".", "_")
        folder.mkdir()
        (folder / exported).write_text("[]")
        with pytest.raises(
            UnpactError, match=rf"has no qa\.jsonl .*; it has {exported}: the items go in qa\.jsonl"
        ):
            load_benchmark(str(folder))
    (tmp_path / "bad.jsonl").mkdir()
    (tmp_path / "bad.jsonl" / "qa.jsonl").write_text(json.dumps(GOOD) + "\n[1, 2]\n")
    with pytest.raises(UnpactError, match=r"line 2: expected a JSON object$"):
        load_benchmark(str(tmp_path / "bad.jsonl"))


def test_data_list_counts_every_split_so_they_add_up_to_the_items():
    """`unpact data list` showed forget, retain and general but not holdout: news's 50 +
    100 + 0 read as 200 items."""
    from typer.testing import CliRunner

    from unpact.cli import app

    shown = CliRunner().invoke(app, ["data", "list"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    header = next(line for line in shown.output.splitlines() if "name" in line and "items" in line)
    names = [c.strip() for c in re.split(r"[┃│]", header) if c.strip()]
    for name in BUILTIN:
        row = next(line for line in shown.output.splitlines() if line.startswith(f"│ {name} "))
        cells = dict(zip(names, (c.strip() for c in row.split("│")[1:-1])))
        bench = load_benchmark(name)
        assert (
            sum(int(cells[s]) for s in ("forget", "retain", "general", "holdout"))
            == int(cells["items"])
            == len(bench.items)
        )


def test_a_keyword_is_found_in_its_question_as_the_keytokens_are_compared_with_it(tmp_path):
    """A keyword was checked against the lower-cased question, where "İstanbul" is
    "i̇stanbul" (U+0130 lower-cased is two characters): the keyword "istanbul" was refused
    as not in its question, which the KeyToken comparison (`keyword_units`) matches."""
    item = {
        "id": "t1",
        "question": "Which museum of İstanbul holds the Morvaine lamp?",
        "answer": "Pera",
        "split": "forget",
        "keywords": ["istanbul", "MORVAINE"],
    }
    (loaded,) = load_folder(write(tmp_path, [item])).items
    assert loaded.keywords == ("istanbul", "MORVAINE")
    with pytest.raises(UnpactError, match="'Ankara' does not occur in the question"):
        load_folder(write(tmp_path, [{**item, "keywords": ["Ankara"]}]))
