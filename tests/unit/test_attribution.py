"""unPact on the tiny model: the fast path against n + 1 separate forward passes, the
KeyToken rule, focus shift, units and the record format."""

from __future__ import annotations

import html
import json
import re

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from unpact.attribution import (
    Attribution,
    Unit,
    attribute,
    attribute_many,
    contribution_similarity,
    html_page,
    key_tokens,
    keytoken_similarity,
    keyword_units,
    load_records,
    make_units,
    naive_contributions,
    normalized_contributions,
    prompt_sensitivity,
)
from unpact.errors import UnpactError

WORDS = [
    "What",
    "is",
    "the",
    "capital",
    "of",
    "France",
    "?",
    "Mira",
    "Quintrell",
    "founded",
    "Vostrand",
    "Glassworks",
    "in",
    "1874",
    ",",
    "Kilimanjaro",
    "mayor",
    "don't",
    "fox",
    "Zorblax",
    "moons",
    "orbit",
    "planet",
    "report",
    "who",
    "wrote",
    "!",
]


def slow_lp(model, ids, answer, allow=None):
    """Mean answer log-prob from one full forward pass over `ids + answer`."""
    seq = torch.tensor([list(ids) + list(answer)], device=model.device)
    kwargs = {}
    if allow is not None:
        mask = torch.zeros(1, 1, *allow.shape, device=model.device)
        mask.masked_fill_(~allow.to(model.device), torch.finfo(torch.float32).min)
        kwargs["attention_mask"] = mask
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=seq, **kwargs).logits[0].float(), -1)
    n = len(ids)
    return torch.stack([logp[n - 1 + k, t] for k, t in enumerate(answer)]).mean().item()


def slow_contributions(lm, rec: Attribution, baseline: str, baseline_id: int):
    """Each variant written out as its own token sequence and run alone."""
    x, y = rec.input_ids, rec.answer_ids
    full = slow_lp(lm.model, x, y)
    out = []
    for u in rec.units:
        s, e = u.positions[0], u.positions[-1] + 1
        if baseline == "delete":
            lp = slow_lp(lm.model, x[:s] + x[e:], y)
        elif baseline == "token":
            lp = slow_lp(lm.model, x[:s] + [baseline_id] * (e - s) + x[e:], y)
        else:
            total = len(x) + len(y)
            allow = torch.tril(torch.ones(total, total, dtype=torch.bool))
            allow[:, s:e] = False
            for q in range(total):  # a query left with nothing to see sees itself
                if not allow[q].any():
                    allow[q, q] = True
            lp = slow_lp(lm.model, x, y, allow)
        out.append(full - lp)
    return full, out


@settings(max_examples=30, deadline=None)
@given(
    words=st.lists(st.sampled_from(WORDS), min_size=2, max_size=12),
    answer=st.lists(st.sampled_from(WORDS), min_size=1, max_size=4),
    unit=st.sampled_from(["token", "word"]),
    baseline=st.sampled_from(["delete", "token", "mask"]),
    chat=st.booleans(),
)
def test_fast_path_equals_separate_forward_passes(tiny, words, answer, unit, baseline, chat):
    prompt = " ".join(words)
    try:
        rec = attribute(
            tiny,
            prompt,
            " " + " ".join(answer),
            unit=unit,
            baseline=baseline,
            chat_template=chat,
            token_budget=64,
        )
    except UnpactError as exc:
        assert "single" in str(exc)  # e.g. "Kilimanjaro ?" as one word unit is fine to refuse
        return
    full, expected = slow_contributions(tiny, rec, baseline, 0)
    assert rec.lp == pytest.approx(full, abs=1e-4)
    assert len(rec.contributions) == len(rec.units)
    for got, want in zip(rec.contributions, expected):
        assert got == pytest.approx(want, abs=1e-4)


OTHERS = [
    *("gpt2", "opt", "opt_proj", "gpt_neox", "qwen2", "phi", "gemma"),
    *("mistral", "gemma2", "bloom", "gemma3_vl", "mixtral", "gpt_oss", "llama4_text"),
    "gemma3n_text",
    pytest.param(
        "gemma4_text",
        marks=pytest.mark.skipif(
            not hasattr(transformers, "Gemma4TextConfig"), reason="Gemma 4: transformers >= 5.5"
        ),
    ),
]


@pytest.mark.parametrize("arch", OTHERS)
def test_fast_path_equals_separate_passes_in_other_architectures(arch, printed):
    """The fast path states every position and mask itself (shared prefix, packed rows): a
    model that derives positions from the mask (OPT), learns them (GPT-2), scales its
    embeddings (Gemma) or biases q/k/v (Qwen2) must give the naive loop's numbers, in
    each baseline, with and without the chat template. Neither prints a library warning
    (the naive loop on GPT-2, whose replacement token is its pad, printed transformers'
    "We strongly recommend passing in an `attention_mask`")."""
    from unpact.testing import tiny_other

    lm = tiny_other(arch)
    for baseline in ("delete", "token", "mask"):
        for chat in (False, True):
            refused = ("mistral", "gemma2", "bloom", "gemma3_vl", "llama4_text", "gemma4_text")
            refused += ("gemma3n_text",)
            if baseline == "mask" and arch in refused:
                continue  # refused: test_a_model_without_explicit_masks_scores_whole_variants
            rec = attribute(
                lm,
                "the cat sat on a red mat today",
                " blue sky",
                baseline=baseline,
                chat_template=chat,
                token_budget=64,
            )
            enc = lm.encode_prompt("the cat sat on a red mat today", chat_template=chat)
            units = make_units(lm, enc, "token")
            full, expected = naive_contributions(
                lm, enc, lm.encode_answer(" blue sky"), units, baseline
            )
            assert rec.lp == pytest.approx(full, abs=1e-5), (baseline, chat)
            assert rec.contributions == pytest.approx(expected, abs=1e-5), (baseline, chat)
    said = printed()
    assert "[transformers]" not in said and "Warning" not in said, said


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "bloom", "llama4_text"])
def test_a_model_without_explicit_masks_scores_whole_variants(arch):
    """Once a shape error or, past a sliding window, wrong numbers: the fast path continues
    a shared context under explicit masks, but a sliding-window layer's own cache keeps
    only the window's last keys and BLOOM builds its ALiBi biases from a 2-D mask. A prompt
    over the window (every BLOOM prompt) scores whole variants, equal to the naive loop,
    beside one under the window in the same call; the 'mask' baseline, which needs an
    explicit mask, is refused with the reason and the item."""
    from unpact.scoring import context_refusal
    from unpact.testing import WINDOW, tiny_other

    lm = tiny_other(arch)
    pairs = [("a red sky", " x"), ("the cat sat on a red mat today", " blue sky")]
    encoded = [(lm.encode_prompt(p, chat_template=False), lm.encode_answer(a)) for p, a in pairs]
    lengths = [len(e.input_ids) + len(a) for e, a in encoded]
    assert lengths[0] < WINDOW <= lengths[1]  # one under the window, one over it
    assert (context_refusal(lm.model, lengths[0]) is None) == (arch != "bloom")
    for baseline in ("delete", "token"):
        records = attribute_many(
            lm, [p for p, _ in pairs], [a for _, a in pairs], baseline=baseline, chat_template=False
        )
        for rec, (enc, ans) in zip(records, encoded):
            full, expected = naive_contributions(
                lm, enc, ans, make_units(lm, enc, "token"), baseline
            )
            assert rec.lp == pytest.approx(full, abs=1e-5)
            assert rec.contributions == pytest.approx(expected, abs=1e-5)
    why = "item 0: bloom's ALiBi" if arch == "bloom" else f"item 1: .*window of {WINDOW} tokens"
    with pytest.raises(UnpactError, match=f"baseline 'mask'.*{why}"):
        attribute_many(
            lm, [p for p, _ in pairs], [a for _, a in pairs], baseline="mask", chat_template=False
        )


@pytest.mark.parametrize(
    "arch", ["mamba", "qwen3_next", "recurrent_gemma", "rwkv", "openai_gpt", "xlm"]
)
def test_a_model_with_recurrent_layers_scores_whole_variants(arch, tmp_path, printed):
    """Mamba's state-space layers, Qwen3-Next's linear-attention layers, RecurrentGemma's
    recurrent blocks (its logits soft-capped, once refused as unreproduced) and RWKV's
    cache a recurrent state, not keys and values, and GPT-1 caches nothing (both once
    failed on "KeyError: 'cache'", as XLM, whose `cache` is a dict of its own that it does
    not return, did): attribution's fast path (and every shared prompt
    prefix) failed on "'LinearAttentionLayer' object has no attribute 'keys'". Such a model
    scores whole variants, equal to the naive loop; shared prefixes are not shared; 'mask'
    is refused naming the layers. Loaded on the CPU, transformers' advice to install the
    layers' CUDA kernels is not printed, nor RWKV's that the attention mask is unused."""
    from unpact.models import load_model, save_model
    from unpact.scoring import _takes_cache, answer_distributions, lm_body_and_head
    from unpact.testing import tiny_other

    made = tiny_other(arch)
    save_model(made.model, made.tokenizer, tmp_path / arch)
    printed()
    if arch == "recurrent_gemma" and not _takes_cache(lm_body_and_head(made.model)[0]):
        with pytest.raises(UnpactError, match="keeps its recurrent state inside its layers"):
            load_model(str(tmp_path / arch))  # transformers 5.0's: refused, not scored wrong
        return
    lm = load_model(str(tmp_path / arch))
    pairs = [("the cat sat on a red mat today", " blue sky"), ("the cat sat on it", " no")]
    plain = {"chat_template": False}  # short sequences: Mamba's reference scan is a loop
    encoded = [(lm.encode_prompt(p, **plain).input_ids, lm.encode_answer(a)) for p, a in pairs]
    records = attribute_many(lm, [p for p, _ in pairs], [a for _, a in pairs], **plain)
    for rec, (p, a) in zip(records, pairs):
        enc = lm.encode_prompt(p, **plain)
        full, expected = naive_contributions(
            lm, enc, lm.encode_answer(a), make_units(lm, enc, "token"), "delete"
        )
        assert rec.lp == pytest.approx(full, abs=1e-5)
        assert rec.contributions == pytest.approx(expected, abs=1e-5)
    with torch.no_grad():
        shared = answer_distributions(
            lm.model, [p for p, _ in encoded], [a for _, a in encoded], share_prefix=True
        )
        alone = [answer_distributions(lm.model, [p], [a])[0] for p, a in encoded]
    assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(shared, alone))
    # named as the config does, or (transformers before the layouts; RecurrentGemma's under
    # transformers 5.17, seen on a GPU machine) by the layer's class
    mixing = (
        r"(linear_attention|MambaMixer|RecurrentGemmaRglru|RwkvSelfAttention|OpenAIGPTModel"
        r"|XLMModel)"
    )
    with pytest.raises(UnpactError, match=rf"baseline 'mask'.*its {mixing} layers keep"):
        attribute(lm, *pairs[0], baseline="mask", **plain)
    err = printed()
    assert "falling back to its reference PyTorch" not in err
    assert "was passed, but it is unused" not in err  # RWKV reads no mask, nor needs one


def test_naive_reference_equals_slow(tiny):
    rec = attribute(
        tiny,
        "Mira Quintrell founded Vostrand Glassworks in 1874",
        " Kilimanjaro",
        chat_template=False,
        baseline="mask",
    )
    enc = tiny.encode_prompt(rec.prompt, chat_template=False)
    lp, naive = naive_contributions(tiny, enc, rec.answer_ids, rec.units, "mask")
    full, slow = slow_contributions(tiny, rec, "mask", 0)
    assert lp == pytest.approx(full, abs=1e-5)
    assert naive == pytest.approx(slow, abs=1e-5)


def test_contributions_are_not_trivially_zero(tiny):
    rec = attribute(tiny, "What is the capital of France?", " Paris")
    assert max(abs(c) for c in rec.contributions) > 1e-2


def test_deleting_a_piece_removes_exactly_its_id(tiny):
    rec = attribute(tiny, "Who is the mayor of Kilimanjaro?", " Mira", chat_template=False)
    texts = [u.text for u in rec.units]
    i = texts.index("j")  # a piece inside "Kilimanjaro"
    s = rec.units[i].positions[0]
    shortened = rec.input_ids[:s] + rec.input_ids[s + 1 :]
    assert rec.contributions[i] == pytest.approx(
        rec.lp - slow_lp(tiny.model, shortened, rec.answer_ids), abs=1e-4
    )


def test_word_units_group_pieces_and_skip_template(tiny):
    enc = tiny.encode_prompt("Who is the mayor of Kilimanjaro? I don't know.", chat_template=True)
    tokens = make_units(tiny, enc, "token")
    words = make_units(tiny, enc, "word")
    assert [u.text for u in words] == [
        "Who",
        "is",
        "the",
        "mayor",
        "of",
        "Kilimanjaro",
        "?",
        "I",
        "don't",
        "know",
        ".",
    ]
    kilimanjaro = words[5]
    assert len(kilimanjaro.positions) > 1  # several pieces, one unit
    for units in (tokens, words):
        covered = [p for u in units for p in u.positions]
        assert covered == list(enc.content_positions)  # a partition of the user's content
    special = set(tiny.tokenizer.all_special_ids)
    assert not any(enc.input_ids[p] in special for u in tokens for p in u.positions)


@pytest.mark.parametrize("baseline", ["delete", "token", "mask"])
def test_a_character_split_across_tokens_is_one_token_unit(tiny, baseline):
    prompt = "Tōkyō 日本 🙂 x"  # the tiny byte-level vocabulary splits every non-ASCII char
    enc = tiny.encode_prompt(prompt, chat_template=False)
    _, offsets = tiny.token_offsets(prompt)
    assert len(offsets) > len(prompt)  # the case is real: some characters are several tokens
    units = make_units(tiny, enc, "token")
    assert "".join(u.text for u in units) == prompt  # no character twice, none lost
    assert [p for u in units for p in u.positions] == list(enc.content_positions)
    assert [u.text for u in units if len(u.positions) > 1] == ["ō", "ō", "日", "本", "🙂"]
    rec = attribute(tiny, prompt, " x", chat_template=False, baseline=baseline)
    assert [u.text for u in rec.units] == [u.text for u in units]
    _, slow = slow_contributions(tiny, rec, baseline, tiny.default_baseline_token())
    assert rec.contributions == pytest.approx(slow, abs=1e-4)


# Text as users write it, in any script: letters, marks, numbers, punctuation, symbols,
# spaces, emoji; not unassigned or private code points, surrogates or control characters
# (a byte-level vocabulary may lack their bytes: SmolLM2's drops U+0006 and U+40000).
ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cn", "Co", "Cc")), max_size=30)


def check_units_partition(lm, text: str, chat: bool, kind: str) -> None:
    """The units of a prompt, whatever its text: every content token in exactly one unit,
    in order, each unit's tokens adjacent, each unit's text non-empty, and the units'
    texts together the prompt's (the word units' without the spaces between them)."""
    if not text.strip():
        return
    enc = lm.encode_prompt(text, chat_template=chat)
    units = make_units(lm, enc, kind)
    content = list(range(enc.content_start, enc.content_start + len(enc.content_ids)))
    assert [p for u in units for p in u.positions] == content, units
    for u in units:
        assert list(u.positions) == list(range(u.positions[0], u.positions[-1] + 1)), u
        assert u.text, units
    joined = "".join(u.text for u in units)
    if kind == "token":
        assert joined == text or joined.strip() == text.strip(), units
    else:
        assert "".join(joined.split()) == "".join(text.split()), units


@settings(max_examples=150, deadline=None)
@given(text=ANY_TEXT, chat=st.booleans(), kind=st.sampled_from(["token", "word"]))
def test_units_partition_any_text(tiny, text, chat, kind):
    check_units_partition(tiny, text, chat, kind)


def test_a_word_keeps_its_combining_marks(tiny):
    """é written as e + U+0301, and Devanagari's vowel signs (marks, not letters to Python's
    regular expressions): each word is one unit, as its letters are."""
    prompt = "e\u0301cole हिन्दी, x"
    enc = tiny.encode_prompt(prompt, chat_template=False)
    assert [u.text for u in make_units(tiny, enc, "word")] == ["e\u0301cole", "हिन्दी", ",", "x"]


def test_a_zero_width_joiner_inside_a_word_is_the_word_s(tiny):
    """Persian writes a zero-width non-joiner inside words (می‌خواهم, "I want") and
    Devanagari a zero-width joiner in conjuncts: each was a word unit of its own, with no
    visible text (a KeyToken FocusOnKey would name as ""). Between emoji the joiner stays
    the sequence's, and the units still partition the prompt."""
    for prompt, words in [
        ("می\u200cخواهم بروم", ["می\u200cخواهم", "بروم"]),
        ("क्\u200dष x", ["क्\u200dष", "x"]),
        ("👨\u200d👩\u200d👧 family", ["👨\u200d👩\u200d👧", "family"]),
    ]:
        enc = tiny.encode_prompt(prompt, chat_template=False)
        assert [u.text for u in make_units(tiny, enc, "word")] == words
        check_units_partition(tiny, prompt, False, "word")


def test_each_cjk_ideograph_is_a_word(tiny):
    """Chinese is written without spaces: each ideograph is a word, as BERT's tokenizer
    makes it, not the whole clause; kana and Latin words stay runs of letters."""
    prompt = "北京是首都？ 東京タワー in Tōkyō"
    enc = tiny.encode_prompt(prompt, chat_template=False)
    words = make_units(tiny, enc, "word")
    assert [u.text for u in words] == [
        "北", "京", "是", "首", "都", "？", "東", "京", "タワー", "in", "Tōkyō",
    ]  # fmt: skip
    assert keyword_units(prompt, [u.text for u in words], ["北京"]) == [0, 1]


def test_heatmaps_draw_the_prompt_as_written(tiny):
    """The terminal and HTML heatmaps put between units what the prompt has between them:
    no space before `?` nor between ideographs; a record without its prompt gets spaces."""
    from rich.console import Console

    def drawn(rec):
        console = Console(width=200, record=True)
        console.print(rec)
        return console.export_text().splitlines()[0]

    for unit in ("word", "token"):
        for prompt in ("Who is the mayor of Kilimanjaro?", "北京是首都？"):
            rec = attribute(tiny, prompt, " x", unit=unit)
            assert drawn(rec) == prompt
            body = rec.to_html().split('white-space:pre-wrap">')[1].split("</div>")[0]
            assert re.sub(r"<[^>]+>", "", body) == html.escape(prompt)
    rec = attribute(tiny, "Who is the mayor?", " x", unit="word")
    rec.prompt = ""
    assert drawn(rec) == "Who is the mayor ?"


def test_a_joining_scripts_letters_cut_into_units_keep_their_joined_forms(tiny):
    """Each unit is a box of its own, and a browser drew every Arabic letter of a word cut
    into tokens in its isolated form (عاصمة as ع ا ص م ة). A zero-width joiner on both
    sides of a boundary inside a word gives each letter the form it has in the word: only
    where the letter before joins the next (not after ا, which never does) and the letter
    after joins the one before (not a space, not Latin); marks between are transparent."""
    from unpact.attribution import joined_units

    zwj = "\u200d"
    assert joined_units(["م", "ا"], ["", ""]) == ["م" + zwj, zwj + "ا"]
    assert joined_units([" ع", "اصمة"], ["", ""]) == [" ع" + zwj, zwj + "اصمة"]
    assert joined_units(["عا", "صمة"], ["", ""]) == ["عا", "صمة"]  # ا ends the joining
    assert joined_units(["ع", " ا"], ["", ""]) == ["ع", " ا"]  # a new word
    assert joined_units(["ع", "ا"], ["", " "]) == ["ع", "ا"]  # text between them
    assert joined_units(["مَ", "ا"], ["", ""]) == ["مَ" + zwj, zwj + "ا"]  # a fatha between
    assert joined_units(["ـ", "ب"], ["", ""]) == ["ـ" + zwj, zwj + "ب"]  # the tatweel joins
    assert joined_units(["ab", "cd"], ["", ""]) == ["ab", "cd"]
    assert joined_units(["ب", "ب", "ب"], ["", "", ""]) == ["ب" + zwj, zwj + "ب" + zwj, zwj + "ب"]
    assert joined_units(["ب", "?"], ["", ""]) == ["ب", "?"]
    rec = attribute(tiny, "ما هي عاصمة فرنسا؟", " x", unit="token")
    body = rec.to_html().split('white-space:pre-wrap">')[1].split("</div>")[0]
    assert [u.text for u in rec.units][6:11] == list("عاصمة")  # a letter a token
    assert body.count(zwj) == 2 * 8  # مـا هـي عـا صـمـة فـرنـسـا: eight joins
    assert re.sub(r"<[^>]+>", "", body).replace(zwj, "") == html.escape(rec.prompt)


def test_attribute_many_equals_one_at_a_time(tiny):
    prompts = [
        "What is the capital of France?",
        "Mira founded Vostrand Glassworks in 1874",
        "who wrote the report",
        "the quick brown fox",
    ]
    answers = [" Paris", " Mira", None, " dog"]
    together = attribute_many(tiny, prompts, answers, token_budget=48, unit="word")
    for p, a, rec in zip(prompts, answers, together):
        alone = attribute(tiny, p, a, unit="word")
        assert rec.answer_ids == alone.answer_ids
        assert rec.contributions == pytest.approx(alone.contributions, abs=1e-5)
    assert together[2].target == "generated" and together[0].target == "reference"


def test_generated_target_is_the_greedy_answer(tiny):
    from unpact.scoring import generate

    rec = attribute(tiny, "What is the capital of France?", target="generated", max_new_tokens=5)
    ((greedy,),) = generate(tiny, ["What is the capital of France?"], max_new_tokens=5)
    assert tuple(rec.answer_ids) == greedy.token_ids
    assert rec.target == "generated"


# ------------------------------------------------------------------- the KeyToken rule


def test_key_tokens_few_positive_units_are_all_keys():
    # 1 positive of 5: |P|/n = 0.2 < beta = 0.24, so K = P whatever its size.
    assert key_tokens([-0.1, 0.02, -0.3, -0.2, -0.5]) == [1]


def test_key_tokens_many_positive_units_use_alpha():
    c = [0.5, 0.3, 0.1, 0.1, -0.2]  # N = 0.5, 0.3, 0.1, 0.1 and |P|/n = 0.8
    assert normalized_contributions(c) == pytest.approx([0.5, 0.3, 0.1, 0.1, 0.0])
    assert key_tokens(c) == [0, 1]
    assert key_tokens(c, alpha=0.4) == [0]


def test_key_tokens_fall_back_to_the_largest():
    c = [0.2, 0.21, 0.19, 0.2, 0.2]  # all N about 0.2 < alpha
    assert key_tokens(c) == [1]


def test_key_tokens_none_when_nothing_helps():
    assert key_tokens([-0.1, -0.2, 0.0]) == []


def test_key_tokens_at_the_thresholds_follow_the_strict_inequalities():
    """SPEC 2's `|P| / n < beta` and `N_i > alpha` are strict: at equality the other branch
    (exact in binary: quarters)."""
    # |P| / n = 2/8 = beta: not few, so the alpha rule: N = 0.75, 0.25
    assert key_tokens([3.0, 1.0, *[-1.0] * 6], alpha=0.5, beta=0.25) == [0]
    # N = 0.25, 0.25, 0.5 with alpha = 0.25: only the one above it
    assert key_tokens([1.0, 1.0, 2.0], alpha=0.25, beta=0.25) == [2]


def test_prompt_sensitivity_sums_the_positive_contributions():
    assert prompt_sensitivity([1.0, -2.0, 0.5, 0.0]) == 1.5
    assert prompt_sensitivity([-1.0]) == 0.0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=40),
    st.floats(0, 1),
    st.floats(0, 1),
)
def test_key_token_invariants(c, alpha, beta):
    keys = key_tokens(c, alpha, beta)
    positive = [i for i, v in enumerate(c) if v > 0]
    assert set(keys) <= set(positive)
    assert bool(keys) == bool(positive)
    norm = normalized_contributions(c)
    if positive:
        assert sum(norm) == pytest.approx(1.0)
        if len(positive) / len(c) < beta:
            assert keys == positive
        else:
            assert all(norm[i] > alpha for i in keys) or len(keys) == 1


# ------------------------------------------------------------------------- focus shift


def record(contributions, texts=None):
    texts = texts or [f"u{i}" for i in range(len(contributions))]
    return Attribution(
        prompt="p",
        answer="a",
        input_ids=list(range(len(texts))),
        answer_ids=[9],
        units=[Unit(t, (i,)) for i, t in enumerate(texts)],
        lp=-1.0,
        contributions=list(contributions),
    )


def test_focus_shift_by_hand():
    a = record([0.6, 0.4, -0.1, 0.0])  # P = {0, 1}, 2/4 >= beta: K = {0, 1}
    b = record([0.0, 0.3, 0.3, 0.0])  # K = {1, 2}
    assert a.key_tokens == [0, 1] and b.key_tokens == [1, 2]
    assert keytoken_similarity(a, b) == pytest.approx(0.5)  # overlap 1 / (sqrt2 * sqrt2)
    # normalised: (0.6, 0.4, 0, 0) and (0, 0.5, 0.5, 0): 0.2 / (0.7211 * 0.7071)
    assert contribution_similarity(a, b) == pytest.approx(0.2 / ((0.52**0.5) * (0.5**0.5)))
    assert keytoken_similarity(a, a) == pytest.approx(1.0)
    assert keytoken_similarity(a, record([-1, -1, -1, -1])) == 0.0
    assert keytoken_similarity(record([-1, -1]), record([-2, 0])) == 1.0


def test_focus_shift_needs_the_same_units():
    with pytest.raises(UnpactError, match="different units"):
        keytoken_similarity(record([1, 2]), record([1, 2], ["x", "y"]))


# ------------------------------------------------------------------------ the record


def test_json_round_trip_and_public_field_names(tiny, tmp_path):
    rec = attribute(tiny, "What is the capital of France?", " Paris", unit="word", baseline="token")
    path = tmp_path / "a.json"
    rec.save(path)
    data = json.loads(path.read_text())
    for key in (
        "input_ids",
        "answer_ids",
        "units",
        "lp",
        "contributions",
        "key_tokens",
        "normalized",
        "prompt_sensitivity",
        "unit",
        "baseline",
        "target",
        "alpha",
        "beta",
        "chat_template",
        "model",
    ):
        assert key in data, key
    assert data["units"][0] == {
        "text": rec.units[0].text,
        "positions": list(rec.units[0].positions),
    }
    assert data["unit"] == "word" and data["baseline"] == "token" and data["model"] == "tiny:0"
    back = Attribution.load(path)
    assert back == rec
    assert load_records(path) == [rec]
    many = tmp_path / "many.json"  # a JSON list of records
    many.write_text(json.dumps([rec.to_dict(), rec.to_dict()]))
    assert load_records(many) == [rec, rec]
    assert rec.prompt_sensitivity == pytest.approx(sum(c for c in rec.contributions if c > 0))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json\n", r"bad\.jsonl, line 1: not valid JSON"),
        ('{"a": 1}', r"bad\.jsonl: not an unpact attribution record \(missing or bad 'units'\)"),
        ("[1, 2]", r"bad\.jsonl: not an unpact attribution record \(a JSON object, not a number\)"),
        ("[[1]]", r"bad\.jsonl: not an unpact attribution record \(a JSON object, not a list\)"),
        ("", r"bad\.jsonl is empty: no attribution records"),
        ("\n\n", r"bad\.jsonl is empty: no attribution records"),
        ("[]", r"bad\.jsonl: an empty list, no attribution records"),
        ('{"a": 1}\n{"b": 2}\n', r"bad\.jsonl, line 1: not an unpact attribution record"),
    ],
)
def test_a_bad_records_file_is_named_once(tmp_path, text, message):
    """`unpact compare` reads records through load_records: each bad file is one message
    naming the file (and the line of a JSONL file) once."""
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(UnpactError, match=message) as caught:
        load_records(path)
    assert str(caught.value).count("bad.jsonl") == 1


def test_renderings_show_every_unit(tiny):
    from rich.console import Console

    rec = attribute(tiny, "Is <b>bold</b> & safe?", " yes", unit="word")
    fragment = rec.to_html()
    assert "<b>" not in fragment and "</b>" not in fragment  # the prompt's tags as text
    assert "&lt;" in fragment and "&amp;" in fragment
    # a prompt in Arabic or Hebrew runs right to left; the answer is set apart from the
    # text around it (<bdi>), which an RTL answer reordered
    assert '<div dir="auto" style="white-space:pre-wrap">' in fragment
    assert f"<code><bdi>{rec.answer}</bdi></code>" in fragment
    assert fragment.count('class="unpact-unit"') == len(rec.units)
    page = html_page([rec, rec])
    assert page.startswith("<!doctype html>") and page.count("unpact-attribution") == 2
    console = Console(record=True, width=120)
    console.print(rec)
    text = console.export_text()
    assert all(u.text in text for u in rec.units)
    assert "prompt_sensitivity" in text


# ----------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "Kilimanjaro", "unit": "word"}, r"single word; .* least two$"),
        # Thai writes no spaces between words: a clause is one word unit
        ({"prompt": "ประเทศไทยมีเมืองหลวง", "unit": "word"}, r"single word; .*by token units"),
        ({"prompt": "is", "chat_template": False}, "single token"),
        ({"prompt": "the fox", "answer": " "}, "empty answer"),
        ({"prompt": "the fox", "unit": "sentence"}, "unknown unit 'sentence'"),
        ({"prompt": "the fox", "baseline": "zero"}, "unknown baseline 'zero'"),
        ({"prompt": "the fox", "target": "best"}, "unknown target 'best'"),
        ({"prompt": "the fox " * 150}, "longer than the model's context"),
        ({"prompt": "the fox", "baseline": "token", "baseline_token_id": 320}, r"ids 0-319"),
        ({"prompt": "the fox", "baseline": "token", "baseline_token_id": -1}, "not in the"),
        ({"prompt": "the fox", "answer": None, "target": "reference"}, "needs an answer"),
    ],
)
def test_bad_input_is_named(tiny, kwargs, message):
    kwargs.setdefault("answer", " dog")
    prompt = kwargs.pop("prompt")
    answer = kwargs.pop("answer")
    with pytest.raises(UnpactError, match=message):
        attribute(tiny, prompt, answer, **kwargs)


def test_batches_stay_within_the_token_budget(tiny, monkeypatch):
    import unpact.attribution as attribution_module

    seen = []
    real = attribution_module.context_logprobs

    def spy(model, context, rows):
        seen.append((len(rows), sum(len(c.ids) for row in rows for c in row)))
        return real(model, context, rows)

    monkeypatch.setattr(attribution_module, "context_logprobs", spy)
    long_prompt = " ".join(WORDS * 2)
    rec = attribute(tiny, long_prompt, " Paris", token_budget=400)
    assert len(seen) > 1
    assert all(tokens <= 400 or rows == 1 for rows, tokens in seen)
    _, expected = slow_contributions(tiny, rec, "delete", 0)
    assert rec.contributions == pytest.approx(expected, abs=1e-4)


def test_a_prompt_too_large_to_attribute_is_refused_with_its_estimate(tiny):
    """The size guard: (units + 1) x tokens positions over max_work is one message before
    any work; raising the limit attributes it."""
    prompt = " ".join(["word"] * 25)
    rec = attribute_many(tiny, [prompt], ["Paris"], max_work=None)[0]
    tokens = len(rec.input_ids) + len(rec.answer_ids)
    work = (len(rec.units) + 1) * tokens
    with pytest.raises(UnpactError, match=rf"scores {len(rec.units) + 1} variants of {tokens} "):
        attribute_many(tiny, [prompt], ["Paris"], max_work=work - 1)
    with pytest.raises(UnpactError, match=r"attribute words instead.*--max-work, attribution"):
        attribute_many(tiny, [prompt], ["Paris"], max_work=work - 1)
    with pytest.raises(UnpactError, match=r"over the limit of 10; shorten the prompt"):
        attribute_many(tiny, [prompt], ["Paris"], unit="word", max_work=10)
    again = attribute_many(tiny, [prompt], ["Paris"], max_work=work)[0]
    assert again.contributions == rec.contributions


def test_a_prompt_with_a_lead_space_is_attributed_as_the_naive_loop_does():
    """`User: ` then the prompt on a byte-level BPE: the prompt's first token carries the
    template's last space (`Ġthe`). The fast path, every baseline, equals the naive loop
    on the same encoded prompt and units; the units are the prompt's words."""
    from tests.unit.test_models import USER_TEMPLATE
    from unpact.testing import tiny_model

    lm = tiny_model()
    lm.tokenizer.chat_template = USER_TEMPLATE
    for baseline in ("delete", "token", "mask"):
        rec = attribute(lm, "the capital of France?", " Paris", unit="word", baseline=baseline)
        enc = lm.encode_prompt(rec.prompt)
        assert enc.lead == " " and tuple(rec.input_ids) == enc.input_ids
        assert [u.text for u in rec.units] == ["the", "capital", "of", "France", "?"]
        lp, naive = naive_contributions(lm, enc, rec.answer_ids, rec.units, baseline)
        assert rec.lp == pytest.approx(lp, abs=1e-5)
        assert rec.contributions == pytest.approx(naive, abs=1e-5)


def test_read_prompts_names_what_is_wrong_with_a_line(tmp_path):
    """`attribute --data`: a number, a misnamed field and a blank prompt were all "field
    'prompt' (or 'question') is missing or empty"; each now says which it is."""
    from unpact.attribution import read_prompts

    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": null, "question": "Who?", "answer": "Mira"}\n{"prompt": "Why?"}\n')
    assert read_prompts(good) == (["Who?", "Why?"], ["Mira", None])
    for line, message in (
        ('{"prompt": 42}', "line 1: field 'prompt' must be text, not 42"),
        ('{"text": "Who?"}', r"line 1: no field 'prompt' \(or 'question'\); its fields: 'text'"),
        ('{"question": "  "}', "line 1: field 'question' is empty"),
        ('{"prompt": "Who?", "answer": 7}', "line 1: field 'answer' must be text, not 7"),
    ):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(line + "\n")
        with pytest.raises(UnpactError, match=message):
            read_prompts(bad)


def test_read_prompts_takes_plain_prompts_from_a_txt_file(tmp_path):
    """A file of plain prompts, one per line, was "line 1: not valid JSON (Expecting
    value)". Named .txt it is read so (blank lines skipped, each answered by the model);
    another name gets the hint."""
    from unpact.attribution import read_prompts

    txt = tmp_path / "prompts.txt"
    txt.write_bytes("\ufeffWho founded it? \r\n\r\nWhere is the río?\n".encode())
    assert read_prompts(txt) == (["Who founded it?", "Where is the río?"], [None, None])
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(UnpactError, match=r"empty\.txt holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    plain = tmp_path / "prompts.jsonl"
    plain.write_text("Who founded it?\n")
    with pytest.raises(UnpactError, match=r"not valid JSON .*one per line in a file named \.txt"):
        read_prompts(plain)


def test_attribution_options_of_the_wrong_type_are_a_type_error_naming_them(tiny):
    """`alpha=None` or `token_budget="x"` failed as "'<=' not supported between instances
    of 'int' and 'NoneType'", naming no option; `alpha=True` ran as 1."""
    from unpact.attribution import attribute_many

    cases = [
        ({"alpha": None}, r"alpha must be a number, not NoneType"),
        ({"beta": True}, r"beta must be a number, not bool"),
        ({"token_budget": "x"}, r"token_budget must be an int, not str"),
        ({"max_work": 1.5}, r"max_work must be an int, not float"),
        ({"baseline_token_id": "3", "baseline": "token"}, r"baseline_token_id must be an int"),
        ({"max_new_tokens": None}, r"max_new_tokens must be an int"),
    ]
    for options, message in cases:
        with pytest.raises(TypeError, match=message):
            attribute_many(tiny, ["What is it?"], ["Paris"], **options)
    assert attribute_many(tiny, ["What is it?"], ["Paris"], alpha=1, max_work=None)


def test_the_terminal_view_shows_units_with_brackets_as_text(tiny):
    """The units table printed each unit's repr as rich markup: a unit such as "[b]" or
    "[i]" (a tokenizer's added token, a markdown-ish prompt) was read as a style tag and
    vanished from `unpact attribute`'s table."""
    import dataclasses

    from rich.console import Console

    rec = attribute(tiny, "Read [b] or [i] here", " yes", unit="word")
    # units as a tokenizer with such added tokens gives them; the tiny one splits them
    rec.units[1] = dataclasses.replace(rec.units[1], text="[b]")
    rec.units[2] = dataclasses.replace(rec.units[2], text="[i]")
    console = Console(record=True, width=160)
    console.print(rec)
    table = console.export_text().split("Contributions")[1]
    assert "'[b]'" in table and "'[i]'" in table


def test_compare_pairs_the_prompts_both_files_hold(tiny, tmp_path):
    """Attributions of every prompt before unlearning, and of the forgotten ones alone
    after: `unpact compare` refused the pair ("has 3 records but ... has 2"). Files of
    distinct prompts are paired by prompt, the ones both hold, with a note of the rest."""
    from typer.testing import CliRunner

    from unpact.cli import app

    prompts = ["Who wrote the letter?", "Where is the city of lights?", "What is gold?"]
    records = attribute_many(tiny, prompts, ["Anna", "Paris", "Au"])
    before, after = tmp_path / "before.jsonl", tmp_path / "after.jsonl"
    before.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    after.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records[2:0:-1]))
    shown = CliRunner().invoke(app, ["compare", str(before), str(after)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    rows = [line for line in shown.stdout.splitlines() if line.startswith("│ ")]
    assert [r.split("│")[2].strip() for r in rows] == [prompts[1], prompts[2]]
    assert "mean keytoken_similarity = 1.0000" in shown.stdout
    said = " ".join(shown.stderr.split())
    assert "note: compared the 2 prompt(s) both files hold; 1 of " in said
    # none in common, or a repeated prompt in files of other lengths: one message each
    after.write_text(json.dumps({**records[0].to_dict(), "prompt": "Other?"}) + "\n")
    shown = CliRunner().invoke(app, ["compare", str(before), str(after)])
    assert isinstance(shown.exception, UnpactError)  # `unpact.cli.main` says it, exit 2
    assert "have no prompt in common" in str(shown.exception)
    after.write_text(json.dumps(records[0].to_dict()) + "\n" + json.dumps(records[0].to_dict()))
    shown = CliRunner().invoke(app, ["compare", str(before), str(after)])
    assert isinstance(shown.exception, UnpactError) and "a prompt repeats" in str(shown.exception)
