"""A model handed in while it trains (dropout on) is scored as the model it is: every public
function that reads a local model runs it in eval mode and puts each module's mode back."""

from __future__ import annotations

import copy

import pytest
import torch

from unpact import LanguageModel, answer_logprobs, generate, score
from unpact.attacks.hidden import continuation_states, last_states
from unpact.attribution import attribute, attribute_many, naive_contributions
from unpact.gradient import gradient_attributions
from unpact.membership_scores import document_stats, gradient_norms, token_stats

PROMPT, ANSWER = "hello there friend", "world"


@pytest.fixture(scope="module")
def dropping(tiny):
    """The tiny model's weights with attention dropout 0.5, in training mode (as a model a
    user trains, or builds with `from_config`), one layer left in eval mode."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(tiny.model.config)
    config.attention_dropout = 0.5
    net = AutoModelForCausalLM.from_config(config)
    net.load_state_dict(tiny.model.state_dict())
    net.train()
    net.model.layers[0].eval()
    return LanguageModel(net, tiny.tokenizer)


def _modes(lm: LanguageModel) -> list[bool]:
    return [m.training for m in lm.model.modules()]


def _naive(lm: LanguageModel) -> list[float]:
    from unpact.attribution import make_units
    from unpact.types import follow

    enc, ids = follow(lm, lm.encode_prompt(PROMPT), ANSWER)
    lp, contributions = naive_contributions(lm, enc, ids, make_units(lm, enc))
    return [lp, *contributions]


def _stats(found: list) -> list[float]:
    return [x for s in found for x in (*s.logprobs, *s.mu, *s.sigma)]


CALLS = {
    "score": lambda lm: [s.lp for s in score(lm, [PROMPT, "a b"], [ANSWER, "c"])],
    "generate": lambda lm: [g.text for [g] in generate(lm, [PROMPT], max_new_tokens=6)],
    "attribute": lambda lm: attribute(lm, PROMPT, ANSWER).contributions,
    "attribute_many": lambda lm: [
        x for r in attribute_many(lm, [PROMPT, "a b c"], [ANSWER, "d"]) for x in r.contributions
    ],
    "naive": _naive,
    "gradient": lambda lm: gradient_attributions(lm, [PROMPT], [ANSWER])[0].scores,
    "token_stats": lambda lm: _stats(token_stats(lm, [PROMPT], [ANSWER])),
    "document_stats": lambda lm: _stats(document_stats(lm, ["a b c d e"])),
    "gradient_norms": lambda lm: gradient_norms(lm, [PROMPT], [ANSWER]),
    "last_states": lambda lm: last_states(lm.model, [[5, 6, 7, 8], [9, 10]]).flatten().tolist(),
    "continuation_states": lambda lm: (
        continuation_states(lm.model, [5, 6, 7], [[8, 9], [10]]).flatten().tolist()
    ),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_training_model_is_read_in_eval_mode_and_left_as_it_was(tiny, dropping, name):
    call = CALLS[name]
    before = _modes(dropping)
    got = call(dropping)
    assert _modes(dropping) == before  # every module's mode put back, the eval layer too
    assert call(dropping) == got  # the same twice: no dropout drawn
    expected = call(tiny)
    if name == "generate":
        assert got == expected
    else:
        assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-5)


def test_a_training_loss_keeps_the_loops_mode(dropping):
    """`grad=True` is a training loss: dropout stays on, as the loop set it."""
    torch.manual_seed(0)  # the dropout masks drawn: the same on every run of the suite
    ids = dropping.tokenizer.encode(PROMPT), dropping.tokenizer.encode(ANSWER)
    a = answer_logprobs(dropping.model, [ids[0]], [ids[1]], grad=True)[0]
    b = answer_logprobs(dropping.model, [ids[0]], [ids[1]], grad=True)[0]
    assert not torch.equal(a, b)
    plain = answer_logprobs(dropping.model, [ids[0]], [ids[1]])
    assert torch.equal(plain[0], answer_logprobs(dropping.model, [ids[0]], [ids[1]])[0])
    assert dropping.model.training


def test_evaluating_takes_the_whole_module_not_its_body():
    """A transformers model's `.model` is its body: a head with dropout outside it (and the
    root's own flag) was left training when the module was unwrapped like an unpact model."""
    from unpact.scoring import evaluating

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Linear(4, 4)
            self.head = torch.nn.Dropout(0.5)

    net = Net().train()
    with evaluating(net):
        assert not any(m.training for m in net.modules())
    assert all(m.training for m in net.modules())
    lm = LanguageModel(net, None)
    with evaluating(lm):
        assert not any(m.training for m in net.modules())
    assert all(m.training for m in net.modules())
    with evaluating("openai:served"):  # a served model: nothing to switch
        pass
