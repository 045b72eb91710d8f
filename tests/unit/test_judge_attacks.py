"""The judges (contains, ROUGE-L, LLM over HTTP, multiple choice by LP) and the attacks."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unpact.attacks import (
    ATTACKS,
    FocusOnKey,
    FocusOnKeyProbab,
    Probab,
    Target,
    emphasis,
    get_attack,
)
from unpact.errors import UnpactError
from unpact.judge import (
    JudgeSettings,
    LLMJudgeSettings,
    Verdict,
    choose_options,
    judge_many,
)
from unpact.scoring import score

SECRET = "sk-test-never-print-me"


# ------------------------------------------------------------------------ the judges


def test_contains_and_rouge_judges_differ_where_they_should():
    verdicts = [
        Verdict("Q?", "It was the glass key of Vorn.", "glass key"),
        Verdict("Q?", "a key made of glass", "glass key"),  # rouge 0.5, no contiguous match
        Verdict("Q?", "Nobody knows.", "glass key", ("Vorn key",)),
        Verdict("Q?", "the Vorn key", "glass key", ("Vorn key",)),
    ]
    assert judge_many(verdicts) == [True, False, False, True]
    assert judge_many(verdicts, JudgeSettings(kind="rouge")) == [True, True, False, True]
    strict = JudgeSettings(kind="rouge", rouge_threshold=1.0)
    assert judge_many(verdicts, strict) == [True, False, False, True]


@pytest.mark.parametrize(
    ("output", "answer", "correct"),
    [
        ("日本の首都は東京です。", "東京", True),  # no spaces between Japanese words
        ("日本の首都は京都です。", "東京", False),
        ("北京是中国的首都", "北京", True),
        ("서울은 한국의 수도입니다", "서울", True),  # a particle written onto the noun
        ("เมืองหลวงคือกรุงเทพ", "กรุงเทพ", True),  # Thai, vowel signs and all
        ("She studied at the e\u0301cole normale.", "école", True),  # e + U+0301
        ("It is in Ｐａｒｉｓ．", "Paris", True),  # full-width letters
        ("«Paris», dit-elle.", "Paris", True),  # Unicode punctuation
        ("Die Straße", "STRASSE", True),  # case folding
        ("Parisian cafés", "Paris", False),  # whole words still
        ("café au lait", "cafe", False),  # an accent is not dropped
    ],
)
def test_contains_reads_every_script(output, answer, correct):
    assert judge_many([Verdict("Q?", output, answer)]) == [correct]
    if correct:  # ROUGE-L recall >= 0.5 takes half the characters: 京都 for 東京
        assert judge_many([Verdict("Q?", output, answer)], JudgeSettings(kind="rouge")) == [True]


def test_verbmem_rouge_reads_words_as_muse_does():
    """MUSE scores VerbMem with rouge_score's ROUGE-L F1 (no stemmer): articles count as
    words, anything but a-z and 0-9 separates them. Our judge's normalisation dropped the
    articles, so a continuation that got only the articles wrong scored 1.0."""
    from unpact.judge import muse_rouge_l_f1, rouge_score_tokens

    assert rouge_score_tokens("The Café's 2nd-floor, A.B!") == [
        "the",
        "caf",
        "s",
        "2nd",
        "floor",
        "a",
        "b",
    ]
    # LCS of [a cat sat on a mat] and [the cat sat on the mat] is [cat sat on mat]: 4 of 6
    assert muse_rouge_l_f1("a cat sat on a mat", "The cat sat on the mat.") == pytest.approx(4 / 6)
    # 2 of 3 output words, 2 of 5 reference words: F1 = 2 * 2 / (3 + 5)
    assert muse_rouge_l_f1("ferry crossed rivers", "The ferry crossed the Ollen") == 0.5
    assert muse_rouge_l_f1("", "anything") == 0.0 and muse_rouge_l_f1("!!", "x") == 0.0


def test_knowmem_cuts_the_answer_where_muse_does_then_scores_rouge_l_f1():
    """MUSE's KnowMem keeps the greedy answer up to a blank line, "\nQuestion" or
    "Question:" (its few-shot prompt lets a model ask itself the next question), then
    scores ROUGE-L F1 against the true answer."""
    from unpact.judge import knowmem_score

    assert (
        knowmem_score("Ollen Ferry\n\nQuestion: who?", "the Ollen Ferry") == 0.8
    )  # 2 of 2, 2 of 3
    assert knowmem_score("Ollen Ferry\nQuestion: who ran it", "Ollen Ferry") == 1.0
    assert knowmem_score("Ollen Ferry. Question: and the other", "Ollen Ferry") == 1.0
    assert knowmem_score("Question: Ollen Ferry", "Ollen Ferry") == 0.0  # nothing before it
    assert knowmem_score("Ollen\nFerry", "Ollen Ferry") == 1.0  # one line break is no stop
    assert knowmem_score("a ferry", "Ollen Ferry") == 0.5  # 1 of 2 words each way


def test_tofu_rouge_is_stemmed_rouge_l_recall():
    """TOFU's ROUGE (open-unlearning's forget_Q_A_ROUGE): the share of the true answer's
    words the answer gives in order, words over 3 letters Porter-stemmed (cities is city;
    was, 3 letters, stays), punctuation and case ignored."""
    from unpact.judge import tofu_rouge_l_recall

    # true: born in paris city; LCS with born in the cities of paris: 3 of 4 (cities = city)
    assert tofu_rouge_l_recall("He was born in the cities of Paris", "Born in Paris city") == 0.75
    assert tofu_rouge_l_recall("Running", "runs") == 1.0  # both stem to run
    assert tofu_rouge_l_recall("PARIS!", "Paris, France") == 0.5
    assert tofu_rouge_l_recall("", "Paris") == 0.0


def test_tofu_rouge_leaves_the_callers_logging_alone(monkeypatch):
    """rouge_score's absl logging called logging.basicConfig() on a root logger without
    handlers: the caller's own basicConfig did nothing after any run."""
    import logging

    from unpact.judge import _stemmed_rouge_l, tofu_rouge_l_recall

    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    _stemmed_rouge_l.cache_clear()
    assert tofu_rouge_l_recall("Paris", "Paris") == 1.0
    assert logging.getLogger().handlers == []


_WORDS = ["the", "a", "cat", "Cat", "sat", "on", "mat", "2nd", "café", "-", ",", " ", "İ", "K"]
_TEXTS = st.one_of(st.lists(st.sampled_from(_WORDS), max_size=12).map(" ".join), st.text())


@settings(deadline=None)  # the first example imports rouge_score (and nltk)
@given(_TEXTS, _TEXTS)
def test_muse_rouge_l_f1_is_rouge_scores_own(output, reference):
    """The slow obvious oracle: Google's rouge_score, as MUSE calls it (rougeL, no stemmer,
    the reference first), on the same texts."""
    from rouge_score import rouge_scorer

    from unpact.judge import muse_rouge_l_f1

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    expected = scorer.score(reference, output)["rougeL"].fmeasure
    assert muse_rouge_l_f1(output, reference) == pytest.approx(expected, abs=1e-12)


def test_ascii_text_normalises_as_it_always_did():
    from unpact.judge import normalize

    assert normalize("The  Glass-Key of  Vorn, isn't it?") == "glass key of vorn isn t it"


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint: 'yes' if the reference is in the model answer; the
    first `busy` requests are answered 429 (a rate limit)."""

    seen: ClassVar[list[dict]] = []
    busy: ClassVar[int] = 0
    reasoning: ClassVar[bool] = False  # answer as OpenAI's reasoning models (GPT-5, o3)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"auth": self.headers.get("Authorization"), "body": body})
        if type(self).reasoning and self._refused(body):
            return
        if type(self).busy > 0:
            type(self).busy -= 1
            self.send_response(429, "Too Many Requests")
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path != "/v1/chat/completions":
            self.send_response(404)
            self.end_headers()
            return
        if self.headers.get("Authorization") != f"Bearer {SECRET}":
            self.send_response(401, "Unauthorized")
            self.end_headers()
            return
        text = body["messages"][0]["content"]
        ref = text.split("Reference answer: ")[1].split("\n")[0]
        out = text.split("Model answer: ")[1].split("\n")[0]
        reply = "Yes." if ref.lower() in out.lower() else "No"
        if "R1" in out:  # DeepSeek-R1 served without a reasoning parser: its template
            reply = "Okay, the answer says no such thing. Hmm, wait.\n</think>\n\n" + reply
        if "QWEN" in out:  # Qwen3 likewise: the whole block in the content
            reply = "<think>\nIs it yes? No, let me see.\n</think>\n\n" + reply
        if out.startswith("SAY "):  # a judge that does not answer in one word
            reply = out[4:]
        if "UNCLOSED" in out:  # out of tokens while thinking
            reply = "<think>\nYes, the answer could be"
        if "THINK" in out or body.get("max_completion_tokens", 1000) < 100:
            reply = None  # a reasoning model: its tokens went to thinking, no content
        message = {"role": "assistant", "content": reply}
        data = json.dumps({"choices": [{"message": message, "finish_reason": "length"}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data.encode())

    def _refused(self, body: dict) -> bool:
        """OpenAI's 400 for a field its reasoning models refuse (the reply's exact form)."""
        if "max_tokens" in body:
            message = (
                "Unsupported parameter: 'max_tokens' is not supported with this model. "
                "Use 'max_completion_tokens' instead."
            )
            param, code = "max_tokens", "unsupported_parameter"
        elif body.get("temperature", 1) != 1:
            message = (
                f"Unsupported value: 'temperature' does not support {body['temperature']} "
                "with this model. Only the default (1) value is supported."
            )
            param, code = "temperature", "unsupported_value"
        else:
            return False
        error = {"message": message, "type": "invalid_request_error", "param": param}
        data = json.dumps({"error": error | {"code": code}}).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return True

    def log_message(self, *args):
        pass


@pytest.fixture()
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    _Judge.seen, _Judge.busy, _Judge.reasoning = [], 0, False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _keyed_judge(monkeypatch, url: str, model: str) -> JudgeSettings:
    """An LLM judge at `url` whose key is in the environment, as a user sets it."""
    monkeypatch.setenv("UNPACT_TEST_KEY", SECRET)
    return JudgeSettings(
        kind="llm",
        llm=LLMJudgeSettings(base_url=url, model=model, api_key_env="UNPACT_TEST_KEY"),
    )


def test_llm_judge_over_http_reads_the_key_from_the_environment(judge_server, monkeypatch):
    settings = _keyed_judge(monkeypatch, judge_server, "judge-1")
    verdicts = [
        Verdict("Who?", "It was Mira Quintrell.", "Quintrell"),
        Verdict("Who?", "Nobody", "X"),
    ]
    assert judge_many(verdicts, settings) == [True, False]
    first = _Judge.seen[0]
    assert first["auth"] == f"Bearer {SECRET}"
    assert first["body"]["model"] == "judge-1"
    assert first["body"]["temperature"] == 0
    # The key is in no settings dump (what a run writes to disk).
    assert SECRET not in json.dumps(settings.model_dump())


def test_judge_cache_key_leaves_out_how_the_llm_is_reached():
    plain = JudgeSettings()
    assert plain.cache_key() == plain.model_dump(mode="json")  # cached stages stay valid

    def llm(**kw):
        return JudgeSettings(kind="llm", llm=LLMJudgeSettings(base_url="http://x/v1", **kw))

    one = llm(model="j", timeout=5, concurrency=1, retries=0, api_key_env=None)
    assert one.cache_key() == llm(model="j").cache_key()
    assert llm(model="j").cache_key() != llm(model="k").cache_key()
    assert llm(model="j", prompt="{question} {answer} {output}?").cache_key() != (
        llm(model="j").cache_key()
    )


def test_llm_judge_retries_a_rate_limit_and_keeps_the_order(judge_server, monkeypatch):
    """A 429 from a hosted judge ended the run; now retried, many requests in flight, the
    verdicts in the order asked."""
    monkeypatch.setenv("UNPACT_TEST_KEY", SECRET)
    _Judge.busy = 3
    settings = JudgeSettings(
        kind="llm",
        llm=LLMJudgeSettings(base_url=judge_server, model="j", api_key_env="UNPACT_TEST_KEY"),
    )
    verdicts = [Verdict("Who?", f"It was {n}.", str(n if n % 3 else -1)) for n in range(12)]
    assert judge_many(verdicts, settings) == [n % 3 != 0 for n in range(12)]
    assert len(_Judge.seen) == 12 + 3
    # no text at all (a reasoning model out of tokens) was read as "no": now said
    with pytest.raises(UnpactError, match=r"replied no text \(finish_reason 'length'\)"):
        judge_many([Verdict("Who?", "THINK", "x")], settings)
    assert _Judge.seen[-1]["body"]["max_tokens"] == 3


def test_llm_judge_reads_a_reasoning_models_verdict_after_its_thinking(judge_server, monkeypatch):
    """A reasoning model served without a reasoning parser (vLLM's default) returns its
    thinking in the content: DeepSeek-R1's after a `<think>` its template wrote into the
    prompt, so with the closing tag alone; Qwen3's with both. The first word was read as
    the verdict ("okay", "think"): every answer judged wrong, every item "forgotten"."""
    settings = _keyed_judge(monkeypatch, judge_server, "r1")
    verdicts = [
        Verdict("Who?", "R1: Mira Quintrell", "Quintrell"),
        Verdict("Who?", "R1: nobody", "Quintrell"),
        Verdict("Who?", "QWEN: Mira Quintrell", "Quintrell"),
        Verdict("Who?", "QWEN: nobody", "Quintrell"),
    ]
    assert judge_many(verdicts, settings) == [True, False, True, False]
    # a block that never closes holds no verdict: said, as a reply with no text is
    with pytest.raises(UnpactError, match=r"replied no text"):
        judge_many([Verdict("Who?", "UNCLOSED Mira Quintrell", "Quintrell")], settings)


def test_llm_judge_reads_yes_or_no_and_says_a_reply_with_neither(judge_server, monkeypatch):
    """A reply that did not start with "yes" ("Answer: yes", "Correct") was read as "no":
    the answer judged wrong, the item counted forgotten, in silence. The verdict is the
    reply's first word where that is yes or no, else the one of the two it holds; a reply
    with neither or both is one message."""
    settings = _keyed_judge(monkeypatch, judge_server, "chatty")
    replies = ["Yes.", "**NO**", "Answer: yes", "Verdict - no.", "yes, but no"]
    verdicts = [Verdict("Who?", f"SAY {r}", "x") for r in replies]
    assert judge_many(verdicts, settings) == [True, False, True, False, True]
    for reply, said in (("Correct", "neither"), ("The model", "neither"), ("Hmm: no? yes", "both")):
        with pytest.raises(UnpactError, match=re.escape(f"replied {reply!r} to 'Who?': {said} ")):
            judge_many([Verdict("Who?", f"SAY {reply}", "x")], settings)


def test_llm_judge_speaks_to_a_reasoning_model(judge_server, monkeypatch):
    """OpenAI's reasoning models (GPT-5, o-series) refuse `max_tokens` and a temperature of 0
    with a 400 naming the field: every verdict failed. Now the judge asks again with
    `max_completion_tokens` and the default temperature, learnt once for all requests."""
    monkeypatch.setenv("UNPACT_TEST_KEY", SECRET)
    _Judge.reasoning = True

    def judge(max_tokens: int) -> JudgeSettings:
        llm = LLMJudgeSettings(
            base_url=judge_server,
            model="gpt-x",
            api_key_env="UNPACT_TEST_KEY",
            max_tokens=max_tokens,
            concurrency=4,
        )
        return JudgeSettings(kind="llm", llm=llm)

    verdicts = [Verdict("Who?", f"It was {n}.", str(n if n % 3 else -1)) for n in range(12)]
    assert judge_many(verdicts, judge(500)) == [n % 3 != 0 for n in range(12)]
    answered = [
        s["body"] for s in _Judge.seen if {"max_tokens", "temperature"}.isdisjoint(s["body"])
    ]
    assert [b["max_completion_tokens"] for b in answered] == [500] * 12
    assert len(_Judge.seen) <= 12 + 2 * 4  # at most the requests in flight asked twice more
    # too little room to think: the message names the setting (and the audit's option)
    with pytest.raises(UnpactError, match=r"judge\.llm\.max_tokens \(unpact audit: --judge"):
        judge_many(verdicts[:1], judge(3))
    # a 400 naming another field is not asked again
    _Judge.reasoning, before = False, len(_Judge.seen)
    with pytest.raises(UnpactError, match="HTTP 401"):
        monkeypatch.setenv("UNPACT_TEST_KEY", "wrong")
        judge_many(verdicts[:1], judge(500))
    assert len(_Judge.seen) == before + 1


def test_llm_judge_failures_are_one_message_without_the_key(judge_server, monkeypatch):
    settings = JudgeSettings(
        kind="llm", llm=LLMJudgeSettings(base_url=judge_server, model="m", api_key_env="NO_KEY")
    )
    monkeypatch.delenv("NO_KEY", raising=False)
    with pytest.raises(UnpactError, match=r"\$NO_KEY, which is not set"):
        judge_many([Verdict("q", "a", "a")], settings)
    monkeypatch.setenv("NO_KEY", "wrong-" + SECRET)
    with pytest.raises(UnpactError, match="HTTP 401") as info:
        judge_many([Verdict("q", "a", "a")], settings)
    assert SECRET not in str(info.value)
    unreachable = JudgeSettings(
        kind="llm",
        llm=LLMJudgeSettings(
            base_url="http://127.0.0.1:9/v1", model="m", api_key_env=None, retries=1
        ),
    )
    with pytest.raises(UnpactError, match=r"LLM judge: .*connection failed"):
        judge_many([Verdict("q", "a", "a")], unreachable)
    with pytest.raises(UnpactError, match=r"judge\.llm"):
        judge_many([Verdict("q", "a", "a")], JudgeSettings(kind="llm"))


def test_multiple_choice_picks_the_highest_lp_option(tiny):
    questions = ["What is the capital of France?", "Who founded the Vostrand Glassworks?"]
    choices = [["Paris", "the lazy dog", "river bank"], ["Mira Quintrell", "fox", "Zorblax", "x"]]
    picked = choose_options(tiny, questions, choices)
    for q, cs, k in zip(questions, choices, picked):
        one_by_one = [score(tiny, [q], [c])[0].lp for c in cs]  # the slow, obvious way
        assert k == max(range(len(cs)), key=one_by_one.__getitem__)


# ------------------------------------------------------------------------ the attacks


def test_focus_on_key_prompt_names_each_key_token_once():
    attack = FocusOnKey()
    assert (
        attack.prompt("Who founded Vostrand Glassworks?", [" Vostrand", "Glass", " Vostrand"])
        == 'Who founded Vostrand Glassworks?\nFocus on "Vostrand", "Glass" to answer.'
    )
    assert attack.prompt("Who?", []) == "Who?"  # nothing to emphasise: the plain question
    assert attack.samples == 0 and attack.keys_from == "original"
    custom = get_attack(
        "focus_on_key",
        {
            "template": "Think about {keys}. {prompt}",
            "key_format": "<{}>",
            "keys_from": "unlearned",
        },
    )
    assert custom.prompt("Who?", ["a", "b"]) == "Think about <a>, <b>. Who?"
    assert custom.keys_from == "unlearned"


def test_sampling_attacks_and_the_registry():
    assert set(ATTACKS) >= {"focus_on_key", "probab", "focus_on_key_probab"}
    probab = get_attack("probab")
    assert isinstance(probab, Probab) and probab.samples == 10 and probab.temperature == 1.0
    assert probab.prompt("Who?", ["x"]) == "Who?"  # PROBAB asks the plain question
    both = get_attack("focus_on_key_probab", {"samples": 3, "seed": 7})
    assert isinstance(both, FocusOnKeyProbab)
    assert both.samples == 3 and both.seed == 7 and both.keys_from == "original"
    assert both.prompt("Who?", ["x"]) == emphasis(both.settings, "Who?", ["x"])
    with pytest.raises(UnpactError, match="unknown attack 'nope'"):
        get_attack("nope")
    with pytest.raises(UnpactError, match="samples"):
        get_attack("probab", {"samples": 0})
    with pytest.raises(UnpactError, match="bogus"):
        get_attack("probab", {"bogus": 1})


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("focus_on_key", {"template": "{promt}: focus on {keys}"}, "{promt} is not filled in"),
        ("focus_on_key", {"template": "{prompt"}, "expected '}' before end of string"),
        ("focus_on_key", {"template": "{prompt.upper}"}, "{prompt.upper} is not filled in"),
        ("focus_on_key", {"template": "{prompt:d}"}, "Unknown format code 'd'"),
        ("focus_on_key", {"key_format": "{}/{}"}, r"key_format: .*use one \{\}"),
        # accepted, then asked without the question, or without naming its keys
        ("focus_on_key", {"template": "Focus on {keys}."}, r"has no \{prompt\}"),
        ("focus_on_key", {"template": "{prompt} Think."}, r"has no \{keys\}"),
        ("focus_on_key", {"key_format": "KEY"}, r"key_format: 'KEY' has no \{\}"),
        ("paraphrase", {"templates": ["What is it?"]}, r"has neither \{question\} nor"),
        ("in_context", {"template": "Q: {question}"}, r"has no \{answer\}"),
        ("in_context", {"template": "A: {answer}"}, r"has no \{question\}"),
        ("paraphrase", {"templates": ["{question}", "{0}"]}, r"templates\.1: '\{0\}'"),
        ("in_context", {"template": "Q: {question} A: {reply}"}, "use {question}, {answer}"),
    ],
)
def test_a_template_is_checked_when_the_config_loads(name, settings, message):
    """Each was accepted, then a KeyError, ValueError or IndexError (or an attribute read)
    when the first forgotten item was asked, after the unlearning; braces doubled are text."""
    with pytest.raises(UnpactError, match=f"attack {name}: .*{message}"):
        get_attack(name, settings)
    focus = get_attack("focus_on_key", {"template": "{{{prompt}}} {keys!r}", "key_format": "<{}>"})
    assert focus.prompt("Who?", ["a"]) == "{Who?} '<a>'"
    with pytest.raises(ValueError, match=r"\{questoin\} is not filled in"):
        LLMJudgeSettings(base_url="http://127.0.0.1:9", model="m", prompt="{questoin}")
    # a judge's prompt that never shows it the model's answer (or the reference) is refused
    with pytest.raises(ValueError, match=r"has no \{output\}"):
        LLMJudgeSettings(base_url="http://127.0.0.1:9", model="m", prompt="Is {answer} right?")
    with pytest.raises(ValueError, match=r"has no \{answer\}"):
        LLMJudgeSettings(base_url="http://127.0.0.1:9", model="m", prompt="")


def test_paraphrase_keeps_the_keywords_in_every_rewording():
    target = Target("Who founded Vostrand Glassworks?", (), ("Vostrand Glassworks",))
    prompts = get_attack("paraphrase").prompts(target)
    assert len(prompts) == 4 and len(set(prompts)) == 4
    assert all("Vostrand Glassworks" in p for p in prompts)
    assert prompts[1] == "I was reading about Vostrand Glassworks. Who founded Vostrand Glassworks?"
    one = get_attack("paraphrase", {"templates": ["{keywords}?"]})
    assert one.prompts(target) == ["Vostrand Glassworks?"]


def test_in_context_shows_seeded_retain_demonstrations_first():
    demos = tuple((f"Q{i}?", f"A{i}") for i in range(10))
    target = Target("Who founded Vostrand?", (), (), demos)
    attack = get_attack("in_context", {"demonstrations": 2})
    (prompt,) = attack.prompts(target)
    blocks = prompt.split("\n\n")
    assert len(blocks) == 3 and blocks[-1] == "Q: Who founded Vostrand?\nA:"
    assert all(b.startswith("Q: Q") and "\nA: A" in b for b in blocks[:2])
    assert attack.prompts(target) == [prompt]  # reproducible
    other = get_attack("in_context", {"demonstrations": 2, "seed": 1}).prompts(target)
    assert other != [prompt]
    assert attack.uses_demonstrations and not get_attack("paraphrase").uses_demonstrations


def test_in_context_without_retain_items_attacks_nothing(tiny):
    """A benchmark without retain items has no demonstrations to show: the attack asked
    the bare question in their format and reported it as in-context recovery. It attacks
    nothing now, and the verdict says what it needs."""
    from unpact.attacks import AttackContext
    from unpact.data.items import QAItem

    items = [QAItem("f0", "Who wrote report 0?", "Mira", "forget")]
    ctx = AttackContext(lambda: tiny, "tiny", items, {}, [], JudgeSettings(max_new_tokens=4))
    attack = get_attack("in_context")
    assert attack.run(ctx) == []
    assert "retain items shown as demonstrations" in attack.applies_to
    demos = (("Who wrote report 9?", "Ann"),)
    ctx = AttackContext(lambda: tiny, "tiny", items, {}, [], JudgeSettings(max_new_tokens=4),
                        demonstrations=demos)  # fmt: skip
    [row] = attack.run(ctx)
    assert row["prompts"][0].startswith("Q: Who wrote report 9?\nA: Ann")


def test_keyword_only_is_the_key_tokens_alone():
    attack = get_attack("keyword_only")
    assert attack.prompts(Target("Who founded Vostrand?", (" Vost", "rand", " Vost"))) == [
        "Vost rand"
    ]
    assert attack.prompts(Target("Who?", ())) == ["Who?"]  # no KeyTokens: the question


def test_a_prompt_over_the_context_names_the_attack_and_the_item(tiny):
    """An attack's prompt that leaves no room for the answer was "item 3: prompt of ...
    tokens", the index in a list the user never sees."""
    from unpact.attacks import AttackContext
    from unpact.data.items import QAItem

    items = [QAItem(f"f{n}", f"Who wrote report {n}?", "Mira", "forget") for n in range(3)]
    keys = {i.id: ["word"] for i in items} | {"f2": [f"w{k}" for k in range(tiny.max_length)]}
    ctx = AttackContext(
        model=lambda: tiny,
        spec="tiny",
        items=items,
        keys=keys,
        retain=[],
        judge=JudgeSettings(max_new_tokens=4),
    )
    with pytest.raises(UnpactError, match=r"item f2 \(forget\): its prompt under attack "
                       r"focus_on_key is \d+ tokens .* context of 256"):  # fmt: skip
        get_attack("focus_on_key").run(ctx)


def test_a_prompt_attack_judges_every_answer_in_one_call(tiny, judge_server, monkeypatch):
    """Its samples were judged item by item: with an LLM judge, a few requests in flight at
    a time. One call now, and the same verdicts as judging each item alone."""
    import unpact.attacks.base as base
    from unpact.attacks import AttackContext
    from unpact.data.items import QAItem

    monkeypatch.setenv("UNPACT_TEST_KEY", SECRET)
    calls = []
    real = base.judge_many
    monkeypatch.setattr(base, "judge_many", lambda v, *a: calls.append(list(v)) or real(v, *a))
    items = [QAItem(f"f{n}", f"Who wrote report {n}?", w, "forget") for n, w in enumerate("at")]
    llm = LLMJudgeSettings(base_url=judge_server, model="j", api_key_env="UNPACT_TEST_KEY")
    judge = JudgeSettings(kind="llm", max_new_tokens=4, llm=llm)
    ctx = AttackContext(lambda: tiny, "tiny", items, {}, [], judge)
    rows = get_attack("probab", {"samples": 3}).run(ctx)
    assert len(calls) == 1 and len(calls[0]) == 2 * 3
    for item, row in zip(items, rows):
        alone = real([Verdict(item.question, o, item.answer) for o in row["outputs"]], judge)
        assert row["recovered"] == any(alone) and len(row["outputs"]) == 3


def test_a_plugin_attacks_rows_are_checked_and_made_plain():
    """An attack that overrides run() (a plugin's) may return numpy's booleans and numbers;
    rows naming no item it was given, or without a true/false 'recovered', are one message
    naming the attack and the row (they were a KeyError or a JSON TypeError after the run)."""
    import numpy as np

    from unpact.attacks import Attack
    from unpact.attacks.base import AttackContext
    from unpact.data.items import QAItem

    items = [QAItem("f1", "Who founded it?", "Mira", split="forget")]
    ctx = AttackContext(lambda: None, "x", items, {}, [], JudgeSettings())
    returned: list = []

    class Rows(Attack):
        name = "test_rows"

        def run(self, ctx):
            return returned

    ATTACKS.pop("test_rows")  # registered by the class statement; not for other tests
    attack = Rows()
    returned[:] = [{"id": "f1", "recovered": np.bool_(True), "score": np.float32(0.5)}]
    (row,) = attack.checked_run(ctx)
    assert row == {"id": "f1", "prompt": "Who founded it?", "recovered": True, "score": 0.5}
    assert type(row["recovered"]) is bool
    for rows, message in [
        ([{"id": "f1", "recovered": "yes"}], r"test_rows: row 0 \(f1\): 'recovered' must be"),
        ([{"id": "f1"}], r"'recovered' must be true or false, not None"),
        ([{"id": "f9", "recovered": True}], r"row 0 names 'f9', not an item it was given"),
        ([{"id": "f1", "recovered": True, "x": object()}], r"row 0 \(f1\) cannot be saved"),
        ({"id": "f1"}, r"run\(\) must return a list of dicts"),
    ]:
        returned[:] = [] if isinstance(rows, dict) else rows
        if isinstance(rows, dict):
            Rows.run = lambda self, ctx, rows=rows: rows  # type: ignore[method-assign]
        with pytest.raises(UnpactError, match=message):
            attack.checked_run(ctx)


def test_a_question_with_no_room_for_the_judged_answer_names_the_setting(tiny):
    """A run's judged answer length comes from judge.max_new_tokens (an audit's
    --max-new-tokens): a question that leaves it no room says so, in a run, in an attack
    and from `answer_items`."""
    from unpact.data.items import QAItem
    from unpact.judge import JudgeSettings, answer_items

    long = QAItem("f-long", "Who founded " + "the very old " * 40 + "Glassworks?", "Mira", "forget")
    settings = JudgeSettings(max_new_tokens=tiny.max_length)
    with pytest.raises(UnpactError, match="item f-long") as e:
        answer_items(tiny, [long], settings)
    assert f"{tiny.max_length} tokens of answer (judge.max_new_tokens; `unpact audit`" in str(
        e.value
    )


def test_a_server_address_with_a_password_is_refused_without_repeating_it():
    """`openai:MODEL@http://USER:PASS@host/v1` (or a judge's base_url so written) was sent
    and also written into results.json, config.yaml, the report and the log, where the API
    key is read from the environment and never stored. It is refused, and the message does
    not repeat it."""
    from pydantic import ValidationError

    from unpact.remote import parse_remote_spec
    from unpact.run import load_config

    assert parse_remote_spec("openai:m@https://host:8000/v1") == ("m", "https://host:8000/v1")
    # a name holding "@" (`unpact serve` and vLLM name a folder's model by its path)
    assert parse_remote_spec("openai:/data/run@3@http://h:8000/v1") == (
        "/data/run@3",
        "http://h:8000/v1",
    )
    for url in ("http://h/v1?key=hunter2", "http://h/v1#hunter2"):
        with pytest.raises(UnpactError, match=r"holds a query \(\?\.\.\.\) or fragment") as info:
            parse_remote_spec(f"openai:m@{url}")
        assert "hunter2" not in str(info.value)
    for url in ("http://u:hunter2@127.0.0.1:8000/v1", "https://hunter2@host/v1"):
        with pytest.raises(UnpactError, match=r"holds a user name or password") as info:
            parse_remote_spec(f"openai:m@{url}")
        assert "hunter2" not in str(info.value)
        with pytest.raises(ValidationError, match="holds a user name or password"):
            LLMJudgeSettings(base_url=url, model="j")
        judge = {"kind": "llm", "llm": {"base_url": url, "model": "j"}}
        with pytest.raises(UnpactError, match=r"judge\.llm\.base_url: the address holds") as info:
            load_config({"methods": [{"method": "ga"}], "judge": judge})
        assert "hunter2" not in str(info.value)
        with pytest.raises(
            UnpactError, match=r"^config: model: remote model spec openai:m@\.\.\.: the"
        ):
            load_config({"model": f"openai:m@{url}", "methods": [{"method": "ga"}]})
