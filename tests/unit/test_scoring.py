"""The hot path against the slow obvious computation: one full forward per pair."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unpact.errors import UnpactError
from unpact.scoring import answer_logprobs, generate, score, token_budget_batches


def reference_logprobs(model, prompt, answer):
    """One pair alone, full logits over the whole sequence, no padding, no tricks."""
    ids = torch.tensor([[*prompt, *answer]], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    n = len(prompt)
    return torch.stack([lp[n - 1 + k, t] for k, t in enumerate(answer)])


def random_pairs(seed, n, vocab, max_prompt=30, max_answer=8):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        lp = int(torch.randint(1, max_prompt + 1, (1,), generator=g))
        la = int(torch.randint(1, max_answer + 1, (1,), generator=g))
        ids = torch.randint(3, vocab, (lp + la,), generator=g).tolist()
        pairs.append((ids[:lp], ids[lp:]))
    return pairs


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_equals_one_at_a_time(tiny, padding_side):
    pairs = random_pairs(0, 12, tiny.model.config.vocab_size)
    got = answer_logprobs(
        tiny.model,
        [p for p, _ in pairs],
        [a for _, a in pairs],
        token_budget=120,
        padding_side=padding_side,
    )
    for (p, a), lp in zip(pairs, got):
        assert lp.shape == (len(a),)
        torch.testing.assert_close(lp, reference_logprobs(tiny.model, p, a), atol=1e-4, rtol=0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), budget=st.integers(1, 200))
def test_batched_equals_reference_any_batching(tiny, seed, n, budget):
    pairs = random_pairs(seed, n, tiny.model.config.vocab_size, max_prompt=12, max_answer=5)
    got = answer_logprobs(
        tiny.model, [p for p, _ in pairs], [a for _, a in pairs], token_budget=budget
    )
    for (p, a), lp in zip(pairs, got):
        torch.testing.assert_close(lp, reference_logprobs(tiny.model, p, a), atol=1e-4, rtol=0)


def test_logprobs_depend_on_the_prompt(tiny):
    """Guards the reference itself: a test on a prompt-blind model would prove nothing."""
    a = [50, 60]
    one, two = answer_logprobs(tiny.model, [[10, 11, 12], [13, 14, 15]], [a, a])
    assert (one - two).abs().max() > 1e-2


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 50), min_size=1, max_size=30), budget=st.integers(1, 300))
def testtoken_budget_batches_cover_each_item_once_within_budget(lengths, budget):
    batches = list(token_budget_batches(lengths, budget))
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget


def test_grad_flows_when_asked(tiny):
    (lp,) = answer_logprobs(tiny.model, [[5, 6, 7]], [[8, 9]], grad=True)
    lp.sum().backward()
    grad = tiny.model.get_input_embeddings().weight.grad
    assert grad is not None and grad.abs().sum() > 0
    tiny.model.zero_grad(set_to_none=True)


def test_bad_items_are_named(tiny):
    with pytest.raises(UnpactError, match="item 1: empty answer"):
        answer_logprobs(tiny.model, [[5], [6]], [[7], []])
    with pytest.raises(UnpactError, match="item 0: prompt \\+ answer is 300 tokens"):
        answer_logprobs(tiny.model, [[5] * 290], [[7] * 10])
    with pytest.raises(UnpactError, match="empty answer"):
        score(tiny, ["hello"], ["  "])
    for bad in (0.0, -1.0, float("nan"), float("inf")):  # nan once reached transformers
        with pytest.raises(UnpactError, match="finite temperature > 0"):
            generate(tiny, ["hello"], num_samples=2, temperature=bad)
    # below vLLM's floor a served model samples at 0.01 and a local one did not: refused
    with pytest.raises(UnpactError, match=r"temperature 0\.005 \(below 0\.01\) is not supported"):
        generate(tiny, ["hello"], num_samples=2, temperature=0.005)
    assert len(generate(tiny, ["hello"], num_samples=2, temperature=0.01, max_new_tokens=2)[0]) == 2
    from unpact.attacks import get_attack

    with pytest.raises(UnpactError, match="temperature: Input should be greater than or equal"):
        get_attack("probab", {"temperature": 0.001})


def test_answer_logprobs_takes_unpacts_own_model(tiny):
    """`unpact.answer_logprobs` given the LanguageModel that `load_model` returns (not its
    `.model`) was "'LanguageModel' object has no attribute 'config'"; anything else is a
    TypeError saying what it takes."""
    ids = ([[5, 6, 7], [8]], [[9, 10], [11]])
    got = answer_logprobs(tiny, *ids)
    want = answer_logprobs(tiny.model, *ids)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    with pytest.raises(TypeError, match="give a transformers model or unpact's LanguageModel"):
        answer_logprobs("gpt2", *ids)


def test_score_text_matches_token_level(tiny):
    (s,) = score(tiny, ["What is the capital of France?"], [" Paris"], chat_template=True)
    expected = reference_logprobs(tiny.model, list(s.prompt.input_ids), list(s.answer_ids))
    assert s.lp == pytest.approx(expected.mean().item(), abs=1e-5)
    assert "".join(s.answer_tokens).replace("Ġ", " ") == " Paris"


def test_seeded_sampling_reproduces(tiny):
    prompts = ["What is the capital of France?", "Who wrote the report?"]
    a = generate(tiny, prompts, num_samples=4, seed=7, max_new_tokens=8)
    b = generate(tiny, list(reversed(prompts)), num_samples=4, seed=7, max_new_tokens=8)
    c = generate(tiny, prompts, num_samples=4, seed=8, max_new_tokens=8)
    assert a == list(reversed(b))  # the same samples whatever the batch or order
    assert a != c
    assert len(a[0]) == 4 and len({g.token_ids for g in a[0]}) > 1


def test_greedy_batched_equals_alone(tiny):
    prompts = [
        "What is the capital of France?",
        "Who?",
        "The quick brown fox jumps over the lazy dog",
    ]
    together = generate(tiny, prompts, max_new_tokens=6)
    alone = [generate(tiny, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone
    # Greedy is the argmax continuation: check its first token by hand.
    enc = tiny.encode_prompt(prompts[0])
    with torch.no_grad():
        first = int(
            tiny.model(torch.tensor([enc.input_ids], device=tiny.device)).logits[0, -1].argmax()
        )
    assert together[0][0].token_ids[0] == first


@pytest.mark.parametrize("grad", [False, True])
def test_shared_prefix_path_equals_reference_values_and_gradients(tiny, grad):
    """Prompts with a common prefix (a chat template's system turn) run it once."""
    prefix = [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]
    pairs = [(prefix + [5 + i] * (1 + i % 3), [60 + i, 70]) for i in range(5)]
    prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
    shared = answer_logprobs(tiny.model, prompts, answers, grad=grad)
    plain = answer_logprobs(tiny.model, prompts, answers, grad=grad, share_prefix=False)
    for (p, a), lp, ref in zip(pairs, shared, plain):
        torch.testing.assert_close(
            lp.detach(), reference_logprobs(tiny.model, p, a), atol=1e-4, rtol=0
        )
        torch.testing.assert_close(lp.detach(), ref.detach(), atol=1e-5, rtol=0)
    if grad:
        params = [w for w in tiny.model.parameters() if w.requires_grad]
        g1 = torch.autograd.grad(torch.cat(shared).sum(), params)
        g2 = torch.autograd.grad(torch.cat(plain).sum(), params)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_shared_prefix_distributions_equal_full_forward_values_and_gradients(tiny):
    """`answer_distributions(share_prefix=True)`: each answer position's whole
    log-distribution equals one full forward over the pair alone; gradients of a KL-like
    sum equal the padded path's."""
    from unpact.scoring import answer_distributions

    prefix = [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]
    pairs = [(prefix + [5 + i] * (1 + i % 3), [60 + i, 70, 71][: 1 + i % 3]) for i in range(5)]
    prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
    shared = answer_distributions(tiny.model, prompts, answers, grad=True, share_prefix=True)
    plain = answer_distributions(tiny.model, prompts, answers, grad=True)
    for (p, a), d in zip(pairs, shared):
        with torch.no_grad():
            full = (
                tiny.model(input_ids=torch.tensor([[*p, *a]], device=tiny.device)).logits[0].float()
            )
        ref = full.log_softmax(-1)[len(p) - 1 : len(p) - 1 + len(a)]
        torch.testing.assert_close(d.detach(), ref, atol=1e-4, rtol=0)
    weights = torch.linspace(0.1, 1.0, shared[0].shape[-1], device=shared[0].device)
    params = [w for w in tiny.model.parameters() if w.requires_grad]
    g1 = torch.autograd.grad(sum((d.exp() * weights).sum() for d in shared), params)
    g2 = torch.autograd.grad(sum((d.exp() * weights).sum() for d in plain), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_answer_states_of_a_mixed_batch_give_each_pairs_logprobs(tiny):
    """One pass over pairs of mixed lengths (a step's facts and rehearsal questions):
    the head applied to each pair's states gives its log-probs alone."""
    from unpact.scoring import answer_states, head_logprobs

    prefix = [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]
    pairs = [(prefix + [5 + i] * (1 + 2 * i), [60 + i] * (1 + (i * 5) % 7)) for i in range(6)]
    states = answer_states(tiny.model, *zip(*pairs), share_prefix=True)
    for (p, a), h in zip(pairs, states):
        got = head_logprobs(tiny.model, h, torch.tensor(a, device=h.device))
        torch.testing.assert_close(
            got.detach(), reference_logprobs(tiny.model, p, a), atol=1e-4, rtol=0
        )


def test_shared_prefix_gradients_repeat_bit_for_bit():
    """Training through the shared-prefix pass (every injection step) is deterministic: the
    prefix's keys/values reach each row through index_select, whose backward adds in a
    fixed order (advanced indexing's backward added the repeated rows with atomics on CPU,
    so the same step gave other last bits each time and injections diverged). On a GPU,
    index_add_ adds with atomics there too: training runs under torch's deterministic
    algorithms (`Trainer.step`), and so does this."""
    from contextlib import nullcontext

    from unpact.determinism import deterministic_kernels
    from unpact.scoring import answer_states
    from unpact.testing import tiny_model

    lm = tiny_model(seed=3)
    net = lm.model
    net.train()
    prefix = list(range(5, 45))
    prompts = [[*prefix, 50 + i, 60 + i % 7] for i in range(48)]
    answers = [[70 + i % 11, 80 + i % 5, 90] for i in range(48)]

    def grads() -> list[torch.Tensor]:
        net.zero_grad(set_to_none=True)
        with deterministic_kernels() if lm.device.type == "cuda" else nullcontext():
            states = answer_states(net, prompts, answers, share_prefix=True)
            (torch.cat(states) ** 2).mean().backward()
        return [p.grad.clone() for p in net.parameters() if p.grad is not None]

    first = grads()
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first, grads()))


def test_a_model_that_changes_its_logits_unknown_to_the_kernel_is_refused():
    """The kernel scores from the body's hidden states through `head_logits`; a model
    whose forward scales its logits otherwise (as Cohere and Granite do) would have been
    scored wrongly, without a word."""
    from unpact.scoring import check_head
    from unpact.testing import tiny_model

    lm = tiny_model(seed=5)
    check_head(lm.model)

    def scaled(_m, _i, out):
        out.logits = out.logits * 3.0
        return out

    handle = lm.model.register_forward_hook(scaled)
    try:
        with pytest.raises(UnpactError, match="not its LM head applied to its last hidden"):
            check_head(lm.model)
        lm.model.logit_scale = 3.0  # Cohere's attribute: the kernel applies it
        check_head(lm.model)
        del lm.model.logit_scale
        lm.model.config.logits_scaling = 1 / 3  # Granite's: it divides
        check_head(lm.model)
    finally:
        handle.remove()


def test_a_diverged_model_is_refused_in_one_message(tmp_path):
    """An unlearning at a far too high lr (a sweep's top value) saved weights whose
    forward overflows: loading it for judging was torch's "atol must be greater than or
    equal to zero, but got -nan" traceback. NaN weights are not saved at all."""
    import torch

    from unpact.models import load_model, save_model
    from unpact.scoring import check_head
    from unpact.testing import tiny_model

    lm = tiny_model(seed=5)
    with torch.no_grad():
        lm.model.lm_head.weight.mul_(1e38)  # finite, overflowing
    save_model(lm.model, lm.tokenizer, tmp_path / "huge")
    with pytest.raises(UnpactError, match=r"huge: its logits are NaN or infinite: no answer"):
        load_model(str(tmp_path / "huge"))
    with torch.no_grad():
        lm.model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(UnpactError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        check_head(lm.model)
    with pytest.raises(UnpactError, match=r"up_proj\.weight holds NaN .* no model is saved"):
        save_model(lm.model, lm.tokenizer, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


@pytest.mark.parametrize(
    "arch",
    [
        *("gpt2", "opt", "opt_proj", "gpt_neox", "qwen2", "phi", "gemma"),
        *("mistral", "gemma2", "bloom", "gemma3_vl", "mixtral", "gpt_oss"),
    ],
)
def test_batched_scoring_and_greedy_generation_in_other_architectures(arch):
    """Scoring states positions itself (padding on either side, the shared prefix's cache):
    in models that learn positions (GPT-2), count them from the mask (OPT) or scale their
    embeddings (Gemma), every pair's log-probs equal one plain forward pass of it, and a
    batch's greedy answers equal those generated one prompt at a time."""
    from unpact.testing import tiny_other

    lm = tiny_other(arch)
    questions = ["the cat sat on a mat", "a red sky", "what is the capital of the blue land"]
    answers = [list(lm.encode_answer(a)) for a in (" blue sky", " x", " the mat is red")]
    for chat in (False, True):
        prompts = [list(lm.encode_prompt(q, chat_template=chat).input_ids) for q in questions]
        for side in ("right", "left"):
            for share in (True, False):
                got = answer_logprobs(
                    lm.model, prompts, answers, padding_side=side, share_prefix=share
                )
                for p, a, lps in zip(prompts, answers, got):
                    with torch.no_grad():
                        logits = lm.model(input_ids=torch.tensor([p + a], device=lm.device)).logits[
                            0
                        ]
                    full = logits.float().log_softmax(-1)
                    want = torch.stack([full[len(p) - 1 + k, t] for k, t in enumerate(a)])
                    torch.testing.assert_close(lps, want, rtol=0, atol=1e-5)
    batched = generate(lm, questions, max_new_tokens=6)
    for q, (answer,) in zip(questions, batched):
        assert generate(lm, [q], max_new_tokens=6)[0][0].text == answer.text


def test_a_model_that_reads_its_padding_answers_each_prompt_as_alone(tiny):
    """RWKV reads no attention mask: left-padded into a batch, a shorter prompt's pads
    entered its state and its greedy answer changed, in silence. Such a model (found by one
    generation step, alone and padded) is batched by prompt length, without padding."""
    from unpact.scoring import reads_padding
    from unpact.testing import tiny_other

    assert not reads_padding(tiny)
    lm = tiny_other("rwkv")
    assert reads_padding(lm)
    questions = ["the cat sat on the mat today and", "a dog", "on the mat", "a red sky"]
    batched = generate(lm, questions, max_new_tokens=5, chat_template=False)
    for q, (answer,) in zip(questions, batched):
        alone = generate(lm, [q], max_new_tokens=5, chat_template=False)[0][0]
        assert alone.token_ids == answer.token_ids


def test_one_string_where_a_list_goes_is_one_clear_error(tiny):
    """`generate(lm, "a question")` was read as a list of characters (and failed on the
    first space as "empty prompt"); lists of different lengths failed inside zip()."""
    from unpact.attribution import attribute_many

    with pytest.raises(UnpactError, match=r"prompts: give a list of texts, not one string"):
        generate(tiny, "What is the capital of France?")
    with pytest.raises(UnpactError, match=r"answers: give a list of texts"):
        score(tiny, ["What is it?"], "Paris")
    with pytest.raises(UnpactError, match=r"prompts: give a list of texts"):
        attribute_many(tiny, "What is it?", ["Paris"])
    with pytest.raises(UnpactError, match=r"2 prompts but 1 answers"):
        score(tiny, ["What is it?", "Who is it?"], ["Paris"])


def test_arguments_of_the_wrong_type_are_a_type_error_naming_them(tiny):
    """They failed deep inside: "'int' object has no attribute 'strip'", "'NoneType' object
    is not iterable", a torch signature listing for a float sample count."""
    from unpact.attribution import attribute_many
    from unpact.data import load_benchmark

    cases = [
        (lambda: generate(tiny, None), r"prompts: give a list of texts, not NoneType"),
        (lambda: generate(tiny, ["hi", 123]), r"prompts\[1\] is int 123, not a text"),
        (lambda: score(tiny, ["hi"], None), r"answers: give a list of texts, not NoneType"),
        (lambda: score(tiny, ["hi"], [5]), r"answers\[0\] is int 5"),
        (lambda: generate(tiny, ["hi"], num_samples=2.5), r"num_samples must be an int"),
        (lambda: generate(tiny, ["hi"], max_new_tokens="5"), r"max_new_tokens must be an int"),
        (lambda: generate(tiny, ["hi"], num_samples=2, temperature="hot"), r"temperature"),
        (lambda: load_benchmark(None), r"a benchmark is a name, a folder or a spec"),
        # a bare transformers model, or a spec, where a loaded model belongs
        (lambda: score(tiny.model, ["hi"], ["x"]), r"LanguageModel\(model, tokenizer\)"),
        (lambda: generate("default", ["hi"]), r"unpact\.load_model\('default'\)"),
        (lambda: attribute_many(tiny.model, ["hi there"], ["x"]), r"not LlamaForCausalLM"),
    ]
    for call, message in cases:
        with pytest.raises(TypeError, match=message):
            call()
    # a None answer is the model's own (generated) answer in attribute_many, and numpy
    # integers are integers
    import numpy as np

    assert len(attribute_many(tiny, ["What is the capital of France?"], [None])) == 1
    assert generate(tiny, ["hi"], max_new_tokens=np.int64(2))[0][0].token_ids is not None
    # a count past int64 was torch's "Overflow when unpacking long long" (`--sample 1e20`)
    with pytest.raises(UnpactError, match=r"num_samples 10{20} is too large"):
        generate(tiny, ["hi"], num_samples=10**20)


def test_sampling_leaves_the_callers_random_streams_as_they_were(tiny):
    """Samples are seeded by their own seed inside a fork of the random state (the CPU's,
    and on a GPU the model's device's): a caller's later draws do not depend on whether a
    sampling stage ran or came from the cache."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    generate(tiny, ["What is the capital of France?"], num_samples=2, max_new_tokens=3, seed=9)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "bloom", "qwen2"])
@pytest.mark.parametrize("grad", [False, True])
def test_a_shared_prefix_over_a_sliding_window_or_under_alibi(arch, grad):
    """Once a shape error: a prefix shared by a batch runs once and its keys continue
    under explicit masks, but a sliding-window layer's own cache (Mistral, Gemma 2) keeps
    only the window's last keys, and BLOOM builds ALiBi from a 2-D mask. Such batches are
    scored whole, equal to one plain forward pass per pair (in training too); a batch
    under the window still shares its prefix (Qwen2 without `use_sliding_window` has none)."""
    from unpact.scoring import answer_distributions, attention_window, context_refusal
    from unpact.testing import WINDOW, tiny_other

    lm = tiny_other(arch)
    assert attention_window(lm.model) == (WINDOW if arch in ("mistral", "gemma2") else None)
    for prefix in (10, 20):  # under and over the window
        head = [1, *range(40, 40 + prefix - 1)]
        prompts = [[*head, 60, 61], [*head, 70], [*head, 80, 81, 82]]
        answers = [[90, 91], [92], [93, 94, 95]]
        longest = max(len(p) + len(a) for p, a in zip(prompts, answers))
        refused = context_refusal(lm.model, longest) is not None
        assert refused == (arch == "bloom" or (arch != "qwen2" and longest >= WINDOW))
        got = answer_logprobs(lm.model, prompts, answers, grad=grad)
        dists = answer_distributions(lm.model, prompts, answers, grad=grad, share_prefix=True)
        for p, a, lps, dist in zip(prompts, answers, got, dists):
            with torch.no_grad():
                ids = torch.tensor([p + a], device=lm.device)
                full = lm.model(input_ids=ids).logits[0].float().log_softmax(-1)
            want = full[len(p) - 1 : len(p) - 1 + len(a)]
            torch.testing.assert_close(dist.detach(), want, rtol=0, atol=1e-5)
            torch.testing.assert_close(
                lps.detach(),
                want.gather(1, torch.tensor(a, device=want.device)[:, None])[:, 0],
                rtol=0,
                atol=1e-5,
            )


def test_greedy_is_plain_whatever_the_generation_config_says():
    """A model's generation_config may ask for beams, banned repeated n-grams, a minimum
    length or suppressed tokens; transformers' generate would follow it, vLLM reads none of
    it. Greedy answers are the argmax at each step, written out by hand here."""
    from unpact.testing import tiny_model

    lm = tiny_model(seed=0)
    gc = lm.model.generation_config
    gc.num_beams, gc.no_repeat_ngram_size, gc.min_new_tokens = 3, 2, 8
    gc.suppress_tokens = [lm.tokenizer.eos_token_id, 129]
    prompts = ["the ferry crossed", "who wrote the"]
    got = generate(lm, prompts, chat_template=False, max_new_tokens=8)
    stops = {lm.tokenizer.eos_token_id}
    for prompt, (g,) in zip(prompts, got):
        ids, new = list(lm.encode_prompt(prompt, False).input_ids), []
        for _ in range(8):
            with torch.no_grad():
                t = int(
                    lm.model(torch.tensor([ids + new], device=lm.device)).logits[0, -1].argmax()
                )
            if t in stops:
                break
            new.append(t)
        assert g.token_ids == tuple(new)
    assert any(len(set(zip(g.token_ids, g.token_ids[1:]))) < len(g.token_ids) - 1 for (g,) in got)


def test_token_ids_the_model_cannot_read_are_one_clear_error(tiny):
    """The id-level kernel (and `LanguageModel.answer_logprobs`) took an id past the
    vocabulary or a negative one to torch's "index out of range in self", a float id to
    "gather(): Expected dtype int32/int64", a text to "too many dimensions 'str'". Each is
    now one message naming the item; tensors and numpy arrays of ids give the list's
    numbers; a batch size of 0 for `generate` is one message, not range()'s."""
    import numpy as np

    vocab = tiny.model.get_input_embeddings().num_embeddings
    for call in (lambda p, a: answer_logprobs(tiny.model, p, a), tiny.answer_logprobs):
        with pytest.raises(UnpactError, match=rf"item 0: the prompt holds token id {vocab}, "):
            call([[1, 2, vocab]], [[3]])
        with pytest.raises(UnpactError, match=r"item 1: the answer holds token id -1"):
            call([[1, 2], [1, 2]], [[3], [-1]])
        with pytest.raises(TypeError, match=r"item 0: the prompt holds float 1\.0"):
            call([[1.0, 2.0]], [[3]])
        with pytest.raises(TypeError, match=r"item 0: the answer is str 'ab', not a list of"):
            call([[1, 2]], ["ab"])
        with pytest.raises(TypeError, match=r"prompts: give a list of token id lists"):
            call("12", [[3]])
        listed = call([[1, 2, vocab - 1]], [[3, 0]])[0]
        for ids in (torch.tensor, np.array):
            assert torch.equal(call([ids([1, 2, vocab - 1])], [ids([3, 0])])[0], listed)
    with pytest.raises(UnpactError, match=r"batch_size must be at least 1, not 0"):
        generate(tiny, ["hi"], batch_size=0)


def test_chat_template_takes_true_false_or_none_not_a_file(tiny):
    """`chat_template="my.jinja"` (meant as a template file) or `"no"` was read as true:
    the model's own template was used, unsaid. Now a TypeError that says where a file
    goes; True, False and None work as before."""
    from unpact.attribution import attribute_many

    for call in (
        lambda flag: generate(tiny, ["hi"], chat_template=flag, max_new_tokens=2),
        lambda flag: score(tiny, ["hi"], ["x"], chat_template=flag),
        lambda flag: attribute_many(tiny, ["hi there"], ["x"], chat_template=flag),
        lambda flag: tiny.encode_prompt("hi", flag),
    ):
        with pytest.raises(TypeError, match=r"not str 'my\.jinja'; a template file goes with"):
            call("my.jinja")
        with pytest.raises(TypeError, match=r"chat_template is True, False or None, not int 0"):
            call(0)
        for flag in (True, False, None):
            call(flag)


def test_an_error_in_the_models_own_code_is_one_message():
    """X-MOD's forward raises "Input language unknown" until a language is set, and
    transformers' generate failed inside a BART decoder's cache: each was a traceback from
    the model's code. It is one message naming the model and the error; running out of
    memory keeps its own error."""
    import torch

    from unpact.scoring import check_head, generate
    from unpact.testing import tiny_model

    lm = tiny_model(seed=5)

    def unknown(_m, _args):
        raise ValueError("Input language unknown")

    handle = lm.model.model.register_forward_pre_hook(unknown)
    try:
        with pytest.raises(UnpactError, match=r"forward pass .* \(ValueError: Input language unk"):
            check_head(lm.model, "my-xmod")
        with pytest.raises(UnpactError, match=r"transformers' generate .*cannot generate with"):
            generate(lm, ["hello"], max_new_tokens=2, chat_template=False)
    finally:
        handle.remove()

    def out_of_memory(_m, _args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    handle = lm.model.model.register_forward_pre_hook(out_of_memory)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            check_head(lm.model)
    finally:
        handle.remove()

    def no_ram(_m, _args):  # the CPU allocator's: 10**9 PROBAB samples were "the model's fault"
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 312000000000 bytes. Error code 12"
        )

    handle = lm.model.model.register_forward_pre_hook(no_ram)
    try:
        with pytest.raises(RuntimeError, match="DefaultCPUAllocator"):
            generate(lm, ["hello"], max_new_tokens=2, chat_template=False)
    finally:
        handle.remove()


def test_a_tokenizer_without_end_or_pad_token_generates():
    """A tokenizer that names no EOS and no pad token (one trained from scratch) made every
    generation a TypeError (the pad id was int(None)). Answers run to max_new_tokens (no
    token stops them), left-padded with id 0, which the mask hides: batched answers equal
    one-at-a-time ones."""
    from unpact.scoring import generate
    from unpact.testing import tiny_model

    lm = tiny_model(seed=5)
    lm.tokenizer.pad_token = None
    lm.tokenizer.eos_token = None
    lm.model.generation_config.eos_token_id = None
    lm.model.generation_config.pad_token_id = None
    prompts = ["hi", "a much longer prompt than that"]
    batched = generate(lm, prompts, max_new_tokens=3, chat_template=False)
    alone = [generate(lm, [p], max_new_tokens=3, chat_template=False)[0] for p in prompts]
    assert batched == alone
    assert all(len(g[0].token_ids) == 3 for g in batched)
    sampled = generate(lm, prompts, max_new_tokens=3, num_samples=2, chat_template=False)
    assert [len(s) for s in sampled] == [2, 2]


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("forced_eos_token_id", 2),  # the last token forced
        ("exponential_decay_length_penalty", (1, 50.0)),  # EOS pushed up
        ("guidance_scale", 3.0),  # classifier-free guidance
        ("watermarking_config", {"greenlist_ratio": 0.5, "bias": 50.0}),
        ("encoder_repetition_penalty", 2.0),
        ("top_h", 0.5),  # samples truncated
        ("dola_layers", "high"),  # failed: DoLa needs the hub's code
        ("token_healing", True),  # failed: needs the tokenizer
        ("prompt_lookup_num_tokens", 3),  # failed: assisted generation
        ("stop_strings", ["a"]),
    ],
)
def test_a_generation_config_changes_no_answer(flag, value):
    """Greedy answers and seeded samples are the plain softmax's, whatever the model's
    generation_config sets: these flags changed them (a forced EOS, a length penalty,
    guidance, a watermark) or failed inside transformers' generate; vLLM reads none."""
    from transformers import GenerationConfig

    from unpact.scoring import generate
    from unpact.testing import tiny_model

    lm = tiny_model(seed=5)
    prompts = ["hi there", "the cat"]

    def answers():
        greedy = generate(lm, prompts, max_new_tokens=5, chat_template=False)
        samples = generate(lm, prompts[:1], max_new_tokens=5, num_samples=2, chat_template=False)
        return greedy, samples

    plain = answers()
    # made as from a generation_config.json (a watermark's dict becomes its config class)
    given = {**lm.model.generation_config.to_dict(), flag: value}
    lm.model.generation_config = GenerationConfig.from_dict(given)
    assert answers() == plain


def test_every_generation_setting_that_shapes_answers_is_neutralised():
    """unpact's answers depend on the prompt and the weights alone: each setting a
    model's generation_config may hold that transformers turns into a logits processor, a
    warper or a stopping criterion is set to its neutral value (`_NEUTRAL_DECODING`), set
    by unpact itself, or harmless. A transformers release that adds one fails here: add it
    to `_NEUTRAL_DECODING` (the flag `top_h` came in that way)."""
    import inspect
    import re

    from transformers.generation.utils import GenerationMixin

    from unpact.scoring import _GREEDY, _NEUTRAL_DECODING

    read = set()
    for method in ("_get_logits_processor", "_get_stopping_criteria"):
        source = inspect.getsource(getattr(GenerationMixin, method))
        read |= set(re.findall(r"generation_config\.(\w+)", source))
    set_by_unpact = {"do_sample", "max_length", "num_return_sequences", "_eos_token_tensor"}
    harmless = {
        "use_cache",  # speed only
        "remove_invalid_values",  # nan/inf to finite: no argmax or draw moves
        "renormalize_logits",  # log-softmax after the processors: the same distribution
        "is_assistant",  # assisted decoding, which unpact never asks for
        "assistant_confidence_threshold",
    }
    left = read - set(_NEUTRAL_DECODING) - set(_GREEDY) - set_by_unpact - harmless
    assert not left, f"generation settings unpact leaves to a model's config: {sorted(left)}"


def test_generation_with_a_minimum_length_says_nothing_and_keeps_it(tiny):
    """`min_new_tokens` (a served request's `min_tokens`) beside the neutral `min_length`
    made transformers log a warning on every request; the minimum still holds: with the
    EOS as its likeliest first token, the row goes on to the minimum all the same."""
    import logging

    from unpact.scoring import generated_rows, stop_ids

    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    keep = Keep()
    logging.getLogger("transformers").addHandler(keep)
    eos = stop_ids(tiny)[0]
    bias = torch.zeros(tiny.model.config.vocab_size, device=tiny.device)
    bias[eos] = 100.0

    def eos_first(_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores + bias

    from transformers import LogitsProcessorList

    try:
        [row] = generated_rows(
            tiny, [[5, 6, 7]], 6, None, 1.0, 1,
            min_new_tokens=4, logits_processor=LogitsProcessorList([eos_first]),
        )  # fmt: skip
    finally:
        logging.getLogger("transformers").removeHandler(keep)
    assert not [m for m in said if "min_new_tokens" in m], said
    assert eos not in row[:4] and row[4] == eos


def test_an_answer_past_the_context_is_one_message_naming_the_prompt_and_the_setting(tiny):
    """`generate` whose prompt and `max_new_tokens` overrun the model's context is refused
    before any model runs, naming the prompt and the setting to lower (it said only
    "shorten it or leave it out", and no test asked)."""
    from unpact import generate

    room = tiny.max_length - len(tiny.encode_prompt("a b c").generation_ids)
    assert generate(tiny, ["a b c"], max_new_tokens=room)  # exactly full: fine
    with pytest.raises(UnpactError, match=r"item 1: the prompt is \d+ tokens .*"
                       r"\(max_new_tokens\) it exceeds the model's context of \d+: "
                       r"shorten it or leave it out, or lower that setting"):  # fmt: skip
        generate(tiny, ["a", "a b c"], max_new_tokens=room + 1)


def test_many_samples_are_drawn_a_memory_budget_at_a_time(tiny, monkeypatch):
    """`generate` holds every sample's cache at once: 2,000 samples of 512 tokens (within
    vLLM's cap on `n`) would need 48 GB for the 135M model, past this machine's memory. A
    prompt's samples are drawn as many at a time as `SAMPLE_BYTES_AT_ONCE` holds, one call
    after another from the same seeded stream; as many as fit are drawn as before."""
    from unpact import scoring
    from unpact.scoring import generated_rows, sample_rows_at_once

    prompt, length = [5, 6, 7], 5
    calls: list[int] = []
    generate = tiny.model.generate

    def counted(*args, **kwargs):
        calls.append(kwargs["num_return_sequences"])
        return generate(*args, **kwargs)

    monkeypatch.setattr(tiny.model, "generate", counted)
    whole = generated_rows(tiny, [prompt], length, 3, 1.0, 7)
    assert calls == [7]  # they fit: one call, as always
    # a budget of 3 rows of this length: 3, 3 and 1, seeded once
    per_row = scoring.SAMPLE_BYTES_AT_ONCE // sample_rows_at_once(tiny.model, len(prompt) + length)
    monkeypatch.setattr(scoring, "SAMPLE_BYTES_AT_ONCE", 3 * per_row + 1)
    assert sample_rows_at_once(tiny.model, len(prompt) + length) == 3
    calls.clear()
    drawn = generated_rows(tiny, [prompt], length, 3, 1.0, 7)
    assert calls == [3, 3, 1] and len(drawn) == 7
    # the same as drawing them by hand, one call after another from one seeded stream
    monkeypatch.setattr(tiny.model, "generate", generate)
    monkeypatch.setattr(scoring, "SAMPLE_BYTES_AT_ONCE", 10**12)
    torch.manual_seed(3)
    by_hand = [row for part in (3, 3, 1) for row in _sampled(tiny, prompt, length, part)]
    assert [r[: len(h)] for r, h in zip(drawn, by_hand, strict=True)] == by_hand
    # the first call's rows are those of a draw of 3 alone
    assert drawn[:3] == generated_rows(tiny, [prompt], length, 3, 1.0, 3)
    assert drawn != whole  # a stream drawn 3 rows at a time is another draw


def _sampled(lm, prompt, length, n):
    """`n` samples from the global stream as it stands (transformers' `generate`, plain
    softmax), each row's ids up to its end."""
    from unpact.scoring import stop_ids

    ids = torch.tensor([prompt], device=lm.device)
    out = lm.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=length,
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=n,
        pad_token_id=stop_ids(lm)[0], eos_token_id=stop_ids(lm),
    )  # fmt: skip
    rows = out[:, len(prompt) :].tolist()
    ends = set(stop_ids(lm))
    return [r[: next((i + 1 for i, t in enumerate(r) if t in ends), len(r))] for r in rows]


def test_the_samples_budget_reads_every_architectures_config():
    """`sample_rows_at_once` reads each model's layer sizes from its config: Gemma 4's
    refuses a model-wide `head_dim` (a per-layer setting; transformers raises), which made
    every sampled answer of such a model fail. Each tiny architecture gets a budget, and
    Gemma 4 draws its samples."""
    from unpact.scoring import generated_rows, sample_rows_at_once
    from unpact.testing import _other_configs, tiny_other

    for arch in _other_configs(320):
        got = sample_rows_at_once(tiny_other(arch).model, 20)
        assert isinstance(got, int) and got > 0, arch
    assert len(generated_rows(tiny_other("gemma4_text"), [[5, 6, 7]], 3, 1, 1.0, 4)) == 4
