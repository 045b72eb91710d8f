"""KnowMem (MUSE) and ROUGE (TOFU) of the judged answers: per item in the records, and left
out with the reason, never scored 0, where ROUGE cannot read the answers."""

from __future__ import annotations

from types import SimpleNamespace

from unpact.data.items import Benchmark, Document, QAItem, VerbatimPrompt
from unpact.judge import knowmem_score, rouge_scorable, tofu_rouge_l_recall
from unpact.run import Data, _record, _ungraded
from unpact.run.config import MembershipSettings
from unpact.run.membership import missing_inputs


def test_knowmem_cuts_the_answer_where_muse_does():
    """MUSE's `get_prefix_before_words_occur`: before a blank line, "\nQuestion" (a
    next question without its colon too) or "Question:"; then ROUGE-L F1 on its words."""
    for tail in ("\n\nRome is next", "\nQuestion 2 asks of Rome", " Question: of Rome"):
        assert knowmem_score("Paris" + tail, "Paris") == 1.0
    assert knowmem_score("Paris Rome", "Paris") == 2 * 1 / (2 + 1)


def test_the_rouge_judge_accepts_half_the_reference_s_words():
    """SPEC 4: ROUGE-L recall >= 0.5 is correct, 0.5 itself included."""
    from unpact.judge import is_correct

    assert is_correct("It was Ossel.", "Ossel Varn", judge="rouge")
    assert not is_correct("It was Varn.", "Ossel Tam Varn", judge="rouge")


def test_rouge_reads_only_a_to_z_and_digits():
    assert rouge_scorable("Paris") and rouge_scorable("1889") and rouge_scorable("東京 Tower")
    assert not rouge_scorable("東京") and not rouge_scorable("Москва") and not rouge_scorable("")
    assert not rouge_scorable("é!")  # rouge_score drops letters beyond ASCII


def _stages(outputs: dict[str, str]) -> SimpleNamespace:
    return SimpleNamespace(
        evals={i: {"output": o, "correct": False} for i, o in outputs.items()}, attrs={}
    )


def test_records_carry_each_answers_scores_and_none_where_rouge_cannot_read():
    items = [
        QAItem("a", "Where?", "the Ollen Ferry", "forget"),
        QAItem("b", "Where?", "東京", "forget"),  # no word rouge_score reads
        QAItem("c", "Which?", "Ollen", "forget", choices=("Ollen", "Vorn")),
    ]
    before = _stages({"a": "Ollen Ferry\n\nQuestion: next", "b": "東京", "c": "Ollen"})
    after = _stages({"a": "a ferry", "b": "大阪", "c": "Vorn"})
    a, b, c = (_record(i, "m", before, after, [], {}) for i in items)
    assert a.knowmem_before == knowmem_score("Ollen Ferry\n\nQuestion: next", "the Ollen Ferry")
    assert a.knowmem_before == 0.8 and a.rouge_after == tofu_rouge_l_recall(
        "a ferry", "the Ollen Ferry"
    )
    # an answer in another script scored 0 both before and after: it read as "forgotten"
    assert b.knowmem_before is None and b.knowmem_after is None and b.rouge_after is None
    assert c.knowmem_after is None and c.rouge_before is None  # multiple choice


def _data(forget: list[QAItem], retain: list[QAItem], **bench: object) -> Data:
    splits = {"forget": forget, "retain": retain, "general": []}
    return Data(Benchmark("b", [*forget, *retain], **bench), splits)  # type: ignore[arg-type]


def test_a_split_rouge_cannot_score_is_said_in_skipped():
    en = [QAItem("r", "Q?", "Paris", "retain")]
    ja = [QAItem("f", "Q?", "東京", "forget")]
    said = _ungraded(_data(ja, en))["knowmem, rouge"]
    assert "no forget answer has a word ROUGE reads" in said and "retain" not in said
    mcq = [QAItem("f", "Q?", "A", "forget", choices=("A", "B"))]
    assert "every forget item is multiple choice" in _ungraded(_data(mcq, en))["knowmem, rouge"]
    assert _ungraded(_data([QAItem("f", "Q?", "東京 Tower", "forget")], en)) == {}


def test_verbmem_over_texts_rouge_cannot_read_is_said_in_skipped():
    forget = [QAItem("f", "Q?", "Paris", "forget")]
    settings = MembershipSettings()
    probes = [VerbatimPrompt("v", "昔々", "あるところに")]
    said = missing_inputs(_data(forget, [], verbatim=probes), settings)["verbmem"]
    assert "no text to continue has a word ROUGE reads" in said
    readable = [VerbatimPrompt("v", "Once", "upon a time")]
    assert "verbmem" not in missing_inputs(_data(forget, [], verbatim=readable), settings)
    docs = [Document("d", "Москва — столица России.", "forget")]
    named = [QAItem("f", "Q?", "Paris", "forget", document="d")]
    assert "verbmem" in missing_inputs(_data(named, [], documents=docs), settings)


def test_relearnings_control_trains_on_the_same_forgotten_items_as_each_model(monkeypatch):
    """Relearning on forgotten items trains on some and answers the rest, so its control on
    the reference runs over each model's own forgotten items (the same split, the same
    items answered); its control over every item the original knew trained on others and
    answered items the model's relearning had trained on. Attacks whose rows stand alone
    keep one control over every known item, shared by the models."""
    import unpact.run as runner
    from unpact.run import Model, ModelStages, Pipeline, _controls, load_config
    from unpact.run import membership as membership_stage

    cfg = load_config(
        {
            "model": "tiny:0",
            "methods": [{"method": "ga"}],
            "attacks": [
                {"name": "quantize"},
                {"name": "relearn", "control": True},
                {"name": "relearn", "label": "on_retain", "control": True,
                 "settings": {"data": "retain"}},
                {"name": "focus_on_key"},
            ],
        }
    )  # fmt: skip
    forget = [QAItem(f"f{n}", f"Q{n}?", "A", "forget") for n in range(6)]
    data = Data(None, {"forget": forget, "retain": [], "general": []})  # type: ignore[arg-type]

    def stages(correct: set[int]) -> ModelStages:
        return ModelStages({f"f{n}": {"correct": n in correct} for n in range(6)}, {})

    all_stages = {"original": stages({0, 1, 2, 3, 4}), "a": stages({0}), "b": stages({0, 1, 2})}
    ran: list[tuple[str, list[str]]] = []

    def attack_stage(p, data, spec, model, opened, items, *rest):
        ran.append((spec.column, [i.id for i in items]))
        return {"ran on": [i.id for i in items]}

    monkeypatch.setattr(runner, "_attack_stage", attack_stage)
    monkeypatch.setattr(membership_stage, "opener", lambda p, spec: None)
    p = Pipeline(cfg, None, print, False)  # type: ignore[arg-type]
    reference = Model("retrained", "tiny:5", "key")
    models = [Model("a", "x", "ka"), Model("b", "y", "kb")]
    controls, why = _controls(p, data, reference, all_stages, models)
    assert why is None
    known = ["f0", "f1", "f2", "f3", "f4"]
    assert sorted(ran) == sorted(
        [
            ("quantize", known),
            ("on_retain", known),
            ("relearn", ["f1", "f2", "f3", "f4"]),  # a's forgotten items
            ("relearn", ["f3", "f4"]),  # b's
        ]
    )
    assert controls["a"]["quantize"] is controls["b"]["quantize"]  # one run, shared
    assert controls["a"]["relearn"] == {"ran on": ["f1", "f2", "f3", "f4"]}
    assert controls["b"]["relearn"] == {"ran on": ["f3", "f4"]}
    assert "focus_on_key" not in controls["a"]
