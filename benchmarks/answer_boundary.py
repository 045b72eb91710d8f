"""What the answer side of a template boundary changes: an answer scored after a generation
prompt that ends in a space (open-unlearning's Llama-2 `Question: q\\nAnswer: `, TOFU's and
MUSE's formats).

Run:  .venv/bin/python benchmarks/answer_boundary.py [--model default] [--items 4]

With that template (docs/audit.md) on the model, for the first general questions it prints
the answer's log-prob as unpact scores it (the prompt ends before the space; the answer's
first token carries it, as the template's text and the answer tokenise together) and as
it was scored before (the space a token of its own, then the answer tokenised alone), and
the answer's first token under each.
"""

from __future__ import annotations

import argparse
import copy

from unpact.data import load_benchmark
from unpact.models import LanguageModel, load_model
from unpact.scoring import answer_logprobs
from unpact.types import follow

QA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}Question: {{ m['content'] }}{{ '\\n' }}{% endfor %}"
    "{{ 'Answer: ' }}"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--items", type=int, default=4)
    args = parser.parse_args()
    base = load_model(args.model)
    tok = copy.deepcopy(base.tokenizer)
    tok.chat_template = QA_TEMPLATE
    lm = LanguageModel(base.model, tok, spec=args.model)
    items = load_benchmark("general").items[: args.items]
    print(f"{'question':52} {'answer':18} {'joined':>8} {'apart':>8}  first tokens")
    for item in items:
        encoded = lm.encode_prompt(item.question)
        scored, joined = follow(lm, encoded, item.answer)
        # before: the generation prompt's own tokens (ending in the lone space), then the
        # answer tokenised alone
        spaced = encoded.generation_ids
        apart = lm.encode_answer(item.answer)
        lp_joined, lp_apart = answer_logprobs(lm.model, [scored.input_ids, spaced], [joined, apart])
        firsts = (
            f"{tok.convert_ids_to_tokens(joined[0])!r} / {tok.convert_ids_to_tokens(apart[0])!r}"
        )
        print(
            f"{item.question[:52]:52} {item.answer[:18]:18} {float(lp_joined.sum()):8.2f} "
            f"{float(lp_apart.sum()):8.2f}  {firsts}"
        )


if __name__ == "__main__":
    main()
