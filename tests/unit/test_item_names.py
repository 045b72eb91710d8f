"""An error about one item names it in the caller's own list: the place in a list the user
gave, or a benchmark item's id, never the place in a list unpact made on the way (the
options of every question flattened, the prompts left to generate for, a membership
stage's texts)."""

from __future__ import annotations

import pytest

from unpact.data.items import QAItem
from unpact.errors import NotForThisModel, UnpactError, items_named

LONG = "Tell me " + "very " * 300 + "truly: who?"  # past the tiny model's 256 positions


def _renamed(error: UnpactError, name) -> UnpactError:
    try:
        with items_named(name):
            raise error
    except UnpactError as exc:
        return exc
    raise AssertionError("nothing raised")


def test_items_named_says_the_callers_name_and_keeps_the_rest():
    names = ["first", "second"]
    got = _renamed(UnpactError("item 1: too long"), lambda n: f"item {names[n]} (x)")
    assert str(got) == "item second (x): too long"
    assert str(_renamed(UnpactError("item 0: too long"), lambda n: "")) == "too long"
    # no item named, or a place the caller's list does not have: the error as it was
    assert str(_renamed(UnpactError("the model is gone"), names.__getitem__)) == (
        "the model is gone"
    )
    assert str(_renamed(UnpactError("item 5: too long"), names.__getitem__)) == ("item 5: too long")
    # another kind of list: a run's documents
    got = _renamed(UnpactError("document 1: nothing to score"), lambda n: f"document d-{n}")
    assert str(got) == "document 1: nothing to score"  # an item's name for a document: no
    said = r"^document d-1 \(holdout\): nothing to score$"
    with (
        pytest.raises(UnpactError, match=said),
        items_named(lambda n: f"document d-{n} (holdout)", "document"),
    ):
        raise UnpactError("document 1: nothing to score")
    # its kind kept: a run leaves out a step the model cannot have
    got = _renamed(NotForThisModel("item 0: no layers"), names.__getitem__)
    assert type(got) is NotForThisModel and str(got) == "first: no layers"


def test_multiple_choice_names_the_question_and_its_option(tiny):
    from unpact.judge import choose_options

    with pytest.raises(
        UnpactError, match=r"^item 1: option 1 \('Tell me very.*\.\.\.'\): prompt \+"
    ):
        choose_options(tiny, ["Who?", "Who?"], [["a", "b"], ["a", LONG]])


def test_a_benchmark_item_is_named_by_its_id(tiny):
    from unpact.judge import answer_items

    items = [
        QAItem("q-0", "Who?", "a", "forget", choices=("a", "b")),
        QAItem("q-7", LONG, "a", "forget", choices=("a", "b")),
    ]
    with pytest.raises(UnpactError, match=r"^item q-7 \(forget\): option 0 \('a'\): prompt"):
        answer_items(tiny, items)


def test_attribution_names_the_prompt_it_generated_for(tiny):
    """Generating targets for a subset of the prompts named the subset's place."""
    from unpact.attribution import attribute_many

    with pytest.raises(UnpactError, match=r"^item 2: the prompt is \d+ tokens"):
        attribute_many(tiny, ["Who?", "What?", LONG], ["a", None, None])


@pytest.mark.parametrize("what", ["token_stats", "gradient_norms_batched", "gradient_norms"])
def test_membership_scores_refuse_a_pair_past_the_context(tiny, what):
    """They were scored past the model's positions and their numbers taken as they came."""
    import unpact.membership_scores as scores

    with pytest.raises(UnpactError, match=r"^item 1: prompt \+ answer is \d+ tokens, longer"):
        getattr(scores, what)(tiny, ["Who?", LONG], ["a", "b"])


@pytest.mark.parametrize("method", ["grad_x_input", "integrated_gradients"])
def test_gradient_attribution_refuses_a_pair_past_the_context(tiny, method):
    """It was attributed past the model's positions, its scores returned as they came."""
    from unpact.gradient import gradient_attributions

    with pytest.raises(UnpactError, match=r"^item 1: prompt \+ answer is \d+ tokens, longer"):
        gradient_attributions(tiny, ["Who?", LONG], ["a", "b"], method=method, steps=2)


def test_unlearning_refuses_an_item_past_the_context_by_its_id(tiny):
    """The loss found it by its place in a batch ("item 1", of an item listed first)."""
    from unpact.unlearn.loop import encode_items

    items = [QAItem("f-0", "Who?", "a", "forget"), QAItem("f-1", LONG, "b", "forget")]
    with pytest.raises(UnpactError, match=r"^item f-1 \(forget\): prompt \+ answer is \d+"):
        encode_items(tiny, items)


@pytest.fixture(scope="module")
def added_token():
    """A tiny model whose tokenizer has a token its embeddings lack, and a prompt with it."""
    from unpact.testing import tiny_model

    lm = tiny_model(seed=0)
    lm.tokenizer.add_tokens(["<zorb>"])
    return lm, "What is <zorb> made of?"


def test_a_benchmark_prompt_the_model_cannot_read_names_its_item(added_token):
    """The message named the prompt's text and no item (evaluation, unlearning)."""
    from unpact.judge import answer_items
    from unpact.unlearn.loop import encode_items

    lm, prompt = added_token
    items = [QAItem("f-0", "Who?", "a", "forget"), QAItem("f-1", prompt, "b", "forget")]
    said = r"^item f-1 \(forget\): the prompt 'What is <zorb> made of\?' holds token id"
    with pytest.raises(UnpactError, match=said):
        answer_items(lm, items)
    with pytest.raises(UnpactError, match=said):
        encode_items(lm, items)


def test_membership_and_gradient_name_the_prompt_they_cannot_read(added_token):
    from unpact.gradient import gradient_attributions
    from unpact.membership_scores import token_stats

    lm, prompt = added_token
    with pytest.raises(UnpactError, match=r"^item 1: the prompt '.*' holds token id"):
        token_stats(lm, ["Who?", prompt], ["a", "b"])
    with pytest.raises(UnpactError, match=r"^item 1: the prompt '.*' holds token id"):
        gradient_attributions(lm, ["Who?", prompt], ["a", "b"], method="grad_x_input")


def _overflowing(poison=None):
    """A tiny model whose residual stream is infinite at each token "Z" (or the token id
    `poison`): its activations overflow there, as a float16 model's may."""
    from unpact.testing import tiny_model

    lm = tiny_model(seed=0)
    if poison is None:
        poison = lm.tokenizer("Z", add_special_tokens=False)["input_ids"][-1]

    def overflow(module, args, output):  # the residual of a token "Z" at infinity
        hidden = output[0] if isinstance(output, tuple) else output
        ids = overflow.ids
        if ids is not None and hidden.shape[1] == ids.shape[1]:
            hidden = hidden.masked_fill((ids == poison)[..., None], float("inf"))
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def remember(module, args, kwargs):
        overflow.ids = kwargs.get("input_ids", args[0] if args else None)

    overflow.ids = None
    lm.model.model.register_forward_pre_hook(remember, with_kwargs=True)
    lm.model.model.layers[0].register_forward_hook(overflow)
    return lm


def test_nan_log_probs_are_refused_naming_the_item():
    """A model whose activations overflow (float16, Gemma's often do) scored NaN, which the
    figures took as they came: refused, naming the item, in the scoring kernel and in the
    membership statistics."""
    from unpact.membership_scores import token_stats
    from unpact.scoring import score

    lm = _overflowing()
    ok = score(lm, ["Who?"], ["a"])
    assert ok[0].lp == ok[0].lp  # finite where no "Z" is read
    said = r"^item 1: the model's log-probs of the answer are NaN: its activations overflow"
    with pytest.raises(UnpactError, match=said):
        score(lm, ["Who?", "Who is Z?"], ["a", "b"])
    with pytest.raises(UnpactError, match=said):
        token_stats(lm, ["Who?", "Who is Z?"], ["a", "b"])


def test_nan_logits_of_a_row_that_has_ended_are_not_refused():
    """A row that has ended is fed padding until its batch ends; logits no answer reads
    were refused where the padding overflowed, failing a batch whose answers were fine."""
    from unpact.scoring import generate

    lm = _overflowing(poison=0)
    assert lm.tokenizer.pad_token_id == 0  # what an ended row is fed
    prompts = ["Who is Mira?", "Who is Tom?"]  # as many tokens: no padding before them
    first = generate(lm, prompts[:1], max_new_tokens=1)[0][0].token_ids[0]
    alone = generate(lm, prompts[1:], max_new_tokens=4)[0][0]
    lm.model.generation_config.eos_token_id = [lm.tokenizer.eos_token_id, first]
    ended, other = generate(lm, prompts, max_new_tokens=4)  # padding fed after step 1
    assert ended[0].token_ids == () and other[0] == alone


def test_nan_logits_stop_generation_naming_the_item():
    """Greedy decoding took a NaN for the largest logit and wrote token 0 again and again
    (judged a wrong answer: "forgotten"); sampling failed inside torch."""
    from unpact.scoring import generate

    lm = _overflowing()
    assert generate(lm, ["Who?", "What?"], max_new_tokens=3)  # nothing overflows
    said = r"^item 2: the model's next-token logits are NaN while generating: its activations"
    prompts = ["Who?", "What?", "Who is Z?"]
    with pytest.raises(UnpactError, match=said):
        generate(lm, prompts, max_new_tokens=3)
    with pytest.raises(UnpactError, match=said):
        generate(lm, prompts, max_new_tokens=3, batch_size=1)
    with pytest.raises(UnpactError, match=said):
        generate(lm, prompts, max_new_tokens=3, num_samples=4, seed=1)
