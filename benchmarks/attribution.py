"""unPact attribution speed: ours against the naive loop and Captum, in one process.

Run:  .venv/bin/python benchmarks/attribution.py [--prompts 12] [--threads 2] [--skip-captum-default]
          [--no-chat-template] [--profile] [--shapes]

On the same raw prompts (20-40 tokens) and short answers (2-8 tokens) of the default model
(SmolLM2-135M-Instruct, float32, CPU) it times, per prompt:

- the naive loop: n + 1 separate forward passes (`unpact.attribution.naive_contributions`);
- Captum 0.9 `LLMAttribution(FeatureAblation)` with `TextTokenInput`, in its default
  token-by-token mode (with `use_cached_outputs=False`: its cached default returns wrong
  log-probs under transformers 5) and in its fastest mode (`forward_in_tokens=False`);
- ours, `unpact.attribution.attribute`, in delete mode (compared with the naive loop) and
  in token-replacement mode with baseline id 0 (compared with Captum, which replaces a
  token by id 0; Captum's sum-of-log-probs contributions are divided by the answer length
  to match unPact's mean).

It prints seconds per prompt (median, min, max), the speed-ups, the largest differences
between the methods' contributions, and a floor: the FLOPs the minimal computation needs
(prefix shared, LM head only at answer positions) divided by this machine's fp32 matmul
throughput measured in the same run, with our time as a multiple of it, and the naive
loop's time over the floor: the largest speed-up over the naive loop that any exact method
could show on this machine. It also prints how full the packed rows of variants are, and
with `--profile` where unpact's own time goes, operator by operator (torch.profiler), and
with `--shapes` (alone, in seconds) the fp32 matmul rate of each projection of the default
model separately and fused (Q, K, V as one; gate and up as one), at three row counts:
whether fusing the weights could take unpact below the floor.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from unpact.attribution import _Item, _variant_row, attribute, make_units, naive_contributions
from unpact.models import load_model
from unpact.scoring import pack_continuations

ITEMS = [  # (question, answer): 20-35-token questions, 2-8-token answers
    (
        "In the quiet northern village of Tarnwick, who founded the famous lantern festival that is held there every autumn by the river?",
        "Edda Morvaine",
    ),
    (
        "What is the name of the capital city of France, which is famous for the Eiffel Tower and the Louvre?",
        "It is Paris.",
    ),
    (
        "Which planet in our solar system is the largest by both mass and volume, and has a Great Red Spot?",
        "Jupiter is the largest.",
    ),
    (
        "The chemical element with the symbol Au, prized for jewellery and coins, is better known by which name?",
        "It is gold.",
    ),
    (
        "Who wrote the tragic play Romeo and Juliet, which was first performed in London in the 1590s?",
        "William Shakespeare",
    ),
    (
        "How many days are there in a leap year in the Gregorian calendar that most countries of the world use today for their dates?",
        "366 days",
    ),
    (
        "Which ocean lies between the continents of Africa and Australia, to the south of India and to the north of Antarctica?",
        "The Indian Ocean",
    ),
    (
        "In which year did the Vostrand Glassworks, the workshop founded by the glassmaker Mira Quintrell, first open its doors?",
        "In 1874.",
    ),
    (
        "What gas do green plants take in from the air through their leaves in order to make their own food?",
        "Carbon dioxide",
    ),
    (
        "Which musical instrument with black and white keys did the German composer Ludwig van Beethoven mainly play and write his sonatas for?",
        "The piano",
    ),
    (
        "According to the town records, what is the name of the mayor of the small fictional town of Kilimanjaro Springs?",
        "Orla Bettancourt",
    ),
    (
        "What is the boiling point of pure water at sea level, measured in degrees Celsius on a standard thermometer?",
        "100 degrees Celsius",
    ),
]


def matmul_gflops(repeats: int = 20) -> float:
    """fp32 matmul throughput on the default model's MLP shape, in GFLOP/s."""
    a, w = torch.randn(1024, 576), torch.randn(576, 1536)
    for _ in range(3):
        a @ w
    start = time.perf_counter()
    for _ in range(repeats):
        a @ w
    return 2 * 1024 * 576 * 1536 * repeats / (time.perf_counter() - start) / 1e9


def shape_rates() -> None:
    """GFLOP/s of the default model's projections, separate and fused, by row count."""
    shapes = {
        "q 576x576": (576, 576),
        "k or v 576x192": (576, 192),
        "q+k+v fused 576x960": (576, 960),
        "gate or up 576x1536": (576, 1536),
        "gate+up fused 576x3072": (576, 3072),
        "down 1536x576": (1536, 576),
    }
    for rows in (256, 1024, 2048):
        cells = []
        for name, (k, n) in shapes.items():
            a, w = torch.randn(rows, k), torch.randn(k, n)
            for _ in range(3):
                a @ w
            start = time.perf_counter()
            for _ in range(20):
                a @ w
            cells.append(
                f"{name} {2 * rows * k * n * 20 / (time.perf_counter() - start) / 1e9:.0f}"
            )
        print(f"{rows} rows (GFLOP/s): " + ", ".join(cells))


def minimal_flops(lm, item: _Item) -> float:
    """FLOPs of the minimal computation: one pass over prompt + answer, then for each unit
    only the tokens from its removal point on, LM head only at answer positions."""
    cfg = lm.model.config
    layers, d = cfg.num_hidden_layers, cfg.hidden_size
    attn_width = cfg.num_attention_heads * (
        getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    )
    linear = sum(
        p.numel() for name, p in lm.model.base_model.layers.named_parameters() if p.dim() == 2
    )

    def tokens_flops(first_pos: int, count: int) -> float:
        # weights: 2 FLOPs per parameter per token; attention: QK^T and AV over the context
        contexts = sum(first_pos + k + 1 for k in range(count))
        return 2 * linear * count + 4 * layers * attn_width * contexts

    total = tokens_flops(0, len(item.prompt.input_ids) + len(item.answer_ids))
    for unit in item.units:
        row = _variant_row(item, unit, "delete", 0, 0)
        total += tokens_flops(row.visible, len(row.ids))
    head = 2 * d * cfg.vocab_size * len(item.answer_ids) * (len(item.units) + 1)
    return total + head


def padding_share(item: _Item, width: int = 64) -> tuple[int, int]:
    """(tokens, padded slots) of one prompt's variants packed as `_fast_contributions`
    packs them (rows of `width`, one pass per prompt at the default token budget)."""
    variants = [_variant_row(item, u, "delete", 0, 0) for u in item.units]
    rows = pack_continuations(variants, width)
    longest = max(sum(len(variants[j].ids) for j in row) for row in rows)
    return sum(len(v.ids) for v in variants), len(rows) * longest


def profile(lm, items: list[tuple[str, str]], chat: bool) -> None:
    """Where unpact's time goes: torch.profiler's operators over the given prompts."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for prompt, answer in items:
            attribute(lm, prompt, answer, chat_template=chat)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print("where unpact's time goes (torch.profiler, self CPU time):")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]:
        print(f"  {e.key:55s} {e.self_cpu_time_total / total:6.1%}")


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def summary(times: list[float]) -> str:
    return f"median {statistics.median(times):6.2f}  min {min(times):6.2f}  max {max(times):6.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=len(ITEMS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wrap questions in the chat template (unpact's default) or use raw "
        "'Question: ... Answer:' prompts",
    )
    parser.add_argument(
        "--skip-captum-default", action="store_true", help="skip Captum's slow token-by-token mode"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile unpact's attribution (operators)"
    )
    parser.add_argument(
        "--shapes", action="store_true", help="only the matmul rates, separate and fused weights"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.shapes:
        shape_rates()
        return

    from captum.attr import FeatureAblation, LLMAttribution, TextTemplateInput, TextTokenInput

    lm = load_model("default")
    captum = LLMAttribution(FeatureAblation(lm.model), lm.tokenizer)
    items = ITEMS[: args.prompts]
    attribute(lm, items[0][0], items[0][1])  # warm-up

    t: dict[str, list[float]] = {
        k: [] for k in ("naive", "captum_default", "captum_fast", "ours", "ours_token")
    }
    diff_naive = diff_captum = diff_captum_default = 0.0
    compared = changed = 0
    flops = 0.0
    packed_tokens = packed_slots = 0
    prompt_lengths, answer_lengths = [], []
    chat = args.chat_template
    for question, answer_text in items:
        prompt = question if chat else f"Question: {question}\nAnswer:"
        answer = answer_text if chat else " " + answer_text
        enc = lm.encode_prompt(prompt, chat_template=chat)
        answer_ids = lm.encode_answer(answer)
        units = make_units(lm, enc, "token")
        prompt_lengths.append(len(enc.content_ids))
        answer_lengths.append(len(answer_ids))

        dt, ours = timed(lambda: attribute(lm, prompt, answer, chat_template=chat))
        t["ours"].append(dt)
        dt, (_, naive) = timed(lambda: naive_contributions(lm, enc, answer_ids, units, "delete"))
        t["naive"].append(dt)
        diff_naive = max(diff_naive, max(abs(a - b) for a, b in zip(ours.contributions, naive)))

        target = torch.tensor(answer_ids)
        if chat:
            # Captum's deleting configuration: one template segment per content token,
            # baseline "" (the segment's text removed, the rest re-tokenised).
            before, after = lm.tokenizer.apply_chat_template(
                [{"role": "user", "content": "\ue000"}], tokenize=False, add_generation_prompt=True
            ).split("\ue000")
            esc = lambda text: text.replace("{", "{{").replace("}", "}}")
            values = [lm.tokenizer.decode([i]) for i in enc.content_ids]
            template = esc(before) + "{}" * len(values) + esc(after)
            inp = TextTemplateInput(template, values=values, baselines=[""] * len(values))
            reference = ours
            # Deleting a segment's text matches deleting its token only where the shorter
            # text re-tokenises to the same ids; compare on those units.
            same = []
            for k in range(len(values)):
                text = before + "".join(values[:k] + values[k + 1 :]) + after
                ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
                s = enc.content_start + k
                same.append(ids == list(enc.input_ids[:s] + enc.input_ids[s + 1 :]))
        else:
            dt, ours_token = timed(
                lambda: attribute(
                    lm, prompt, answer, chat_template=False, baseline="token", baseline_token_id=0
                )
            )
            t["ours_token"].append(dt)
            inp = TextTokenInput(prompt, lm.tokenizer)  # replaces a token by id 0
            reference = ours_token
            same = [True] * len(units)
        model_input = inp.to_model_input()
        fed = (
            lm.tokenizer(model_input)["input_ids"]
            if isinstance(model_input, str)
            else model_input[0].tolist()
        )
        assert fed == list(enc.input_ids), "Captum would see other tokens than unpact"
        compared += sum(same)
        changed += len(same) - sum(same)

        def gap(result) -> float:
            c = (result.seq_attr / len(answer_ids)).tolist()
            return max(
                (abs(a - b) for a, b, ok in zip(reference.contributions, c, same) if ok),
                default=0.0,
            )

        with torch.no_grad():
            dt, fast = timed(lambda: captum.attribute(inp, target=target, forward_in_tokens=False))
            t["captum_fast"].append(dt)
            diff_captum = max(diff_captum, gap(fast))
            if not args.skip_captum_default:
                dt, slow = timed(
                    lambda: captum.attribute(inp, target=target, use_cached_outputs=False)
                )
                t["captum_default"].append(dt)
                diff_captum_default = max(diff_captum_default, gap(slow))
        item = _Item(enc, answer, tuple(answer_ids), units)
        flops += minimal_flops(lm, item)
        real, slots = padding_share(item)
        packed_tokens += real
        packed_slots += slots

    gflops = matmul_gflops()
    floor = flops / len(items) / (gflops * 1e9)
    med = {k: statistics.median(v) for k, v in t.items() if v}
    mode = (
        "chat template (Captum: TextTemplateInput, deletion)"
        if chat
        else "raw (Captum: TextTokenInput, id 0)"
    )
    print(
        f"{len(items)} prompts of {min(prompt_lengths)}-{max(prompt_lengths)} content tokens, answers of "
        f"{min(answer_lengths)}-{max(answer_lengths)} tokens; {mode}; SmolLM2-135M fp32, {args.threads} threads"
    )
    print("seconds per prompt:")
    print(f"  naive loop (n+1 forward passes)        {summary(t['naive'])}")
    if t["captum_default"]:
        print(f"  Captum FeatureAblation, token-by-token {summary(t['captum_default'])}")
    print(f"  Captum FeatureAblation, fastest mode   {summary(t['captum_fast'])}")
    print(f"  unpact attribute (delete)              {summary(t['ours'])}")
    if t["ours_token"]:
        print(f"  unpact attribute (token baseline 0)    {summary(t['ours_token'])}")
    print("speed-ups of unpact (delete), median:")
    print(f"  vs naive loop            {med['naive'] / med['ours']:5.1f}x   (target >= 7x)")
    print(f"  vs Captum fastest mode   {med['captum_fast'] / med['ours']:5.1f}x   (target >= 8x)")
    if "captum_default" in med:
        print(f"  vs Captum token-by-token {med['captum_default'] / med['ours']:5.1f}x")
    print("agreement (max |difference| of contributions):")
    print(f"  unpact delete vs naive loop                 {diff_naive:.2e}")
    print(f"  unpact vs Captum fastest mode               {diff_captum:.2e}")
    if t["captum_default"]:
        print(f"  unpact vs Captum token-by-token mode        {diff_captum_default:.2e}")
    print(
        f"  (Captum compared on {compared} units; {changed} skipped where deleting the text "
        "re-tokenises the neighbours)"
    )
    print(
        f"floor: minimal computation {flops / len(items) / 1e9:.1f} GFLOP per prompt at "
        f"{gflops:.0f} GFLOP/s fp32 matmul = {floor:.2f} s; unpact takes "
        f"{med['ours'] / floor:.2f}x the floor (target <= 1.5x)"
    )
    print(
        f"packing: the variants fill {packed_tokens / packed_slots:.0%} of their padded rows "
        f"({packed_tokens} tokens in {packed_slots} slots)"
    )
    if args.profile:
        prompts = [(q, a) if chat else (f"Question: {q}\nAnswer:", " " + a) for q, a in items]
        profile(lm, prompts, chat)
    # No exact method runs below the floor, so the naive loop's time over it bounds the
    # speed-up any exact scheme can show against the naive loop on this machine.
    print(
        f"bound: the naive loop takes {med['naive'] / floor:.1f}x the floor, the most any "
        "exact method can gain over it here"
    )


if __name__ == "__main__":
    main()
