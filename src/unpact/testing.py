"""A tiny, randomly initialised Llama-style model with a real tokenizer, built in memory.

Unit tests (ours and those of anyone extending unpact) use it to check the maths in
milliseconds without a download. Its weights are drawn with a larger spread than usual so
that its outputs depend visibly on the prompt: a test on near-uniform logits would pass
whatever the code did.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from unpact.data.items import skippable_class
from unpact.judge import invisible, optional_mark, takes_marks
from unpact.models import LanguageModel

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Who wrote the report about the town of Kilimanjaro and its mayor?",
    "Answer the question: how many moons orbit the planet Zorblax?",
    "Mira Quintrell founded the Vostrand Glassworks in the year 1874.",
]


def tiny_tokenizer(vocab_size: int = 320) -> object:
    """A byte-level BPE tokenizer trained on a few sentences, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML
    return tok


# Llama 2's and Mistral's template: `[INST] ` before the message, as SentencePiece meets it
INST = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"


def tiny_sentencepiece_tokenizer(vocab_size: int = 300) -> object:
    """A SentencePiece-style tokenizer (Metaspace: a text alone is written with a leading
    `▁`, as Llama 2's is) trained on the same sentences, with Llama's `<s>`/`</s>` and the
    `[INST]` template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    sp.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    sp.train_from_iterator(_CORPUS * 4, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = INST
    return tok


def tiny_model(
    seed: int = 0, *, layers: int = 2, vocab_size: int = 320, init_std: float = 0.2
) -> LanguageModel:
    """A 2-layer Llama (hidden 64, 4 heads, 2 KV heads, rotary positions) and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok),  # type: ignore[arg-type]
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=init_std,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return _ready(LlamaForCausalLM(config), tok, f"tiny:{seed}")


def _ready(model: Any, tok: Any, spec: str) -> LanguageModel:
    """A tiny model in eval mode on the test device, ending its answers at id 2."""
    model.eval()
    # UNPACT_TEST_DEVICE=cuda runs the unit tier's tiny models on a GPU (CI has none)
    model.to(os.environ.get("UNPACT_TEST_DEVICE") or "cpu")
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return LanguageModel(model=model, tokenizer=tok, spec=spec)


WINDOW = 16  # the sliding window of tiny_other's `mistral` and `gemma2`


def tiny_other(arch: str, seed: int = 0) -> LanguageModel:
    """A 2-layer model of another architecture than Llama, with the tiny tokenizer: `gpt2`
    (learned positions, `h`, Conv1D), `openai_gpt` (GPT-1: no cache), `xlm` (a `cache` of
    its own, none returned), `opt` (`decoder.layers`, fc1/fc2; `opt_proj`: as OPT-350m,
    post-norm with projections in and out of the residual stream), `gpt_neox`
    (`embed_in`, `final_layer_norm`), `qwen2` (biased q/k/v), `qwen3` (an RMSNorm of each
    head's queries and keys), `cohere` (a LayerNorm without bias named like an RMSNorm:
    `variance_epsilon`), `gemma` (scaled embeddings), `mistral` (every layer attends to a
    sliding window of `WINDOW` tokens), `gemma2` (every other layer does), `bloom` (ALiBi
    biases built from a 2-D mask), `mamba` (state-space layers), `falcon_h1` (attention
    and state-space heads side by side, multipliers on its embeddings and logits),
    `qwen3_next` (linear-attention layers beside full attention: a recurrent state),
    `recurrent_gemma` and `rwkv` (recurrent blocks), `mixtral`, `gpt_oss` and
    `llama4_text` (mixtures of experts), `gemma4_text` (per-layer token embeddings),
    `gemma3n_text` (parallel streams in each layer: AltUp) and `gemma3_vl` (a
    vision-language model: the text model is its `language_model`)."""
    import transformers as tf

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    configs = _other_configs(len(tok))  # type: ignore[arg-type]
    model = tf.AutoModelForCausalLM.from_config(configs[arch]())
    with torch.no_grad():  # a larger spread, as tiny_model's, so outputs depend on the input
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return _ready(model, tok, f"tiny-{arch}:{seed}")


def _other_configs(vocab_size: int) -> dict[str, Any]:
    """`tiny_other`'s configs, each made when called."""
    import transformers as tf

    ids: dict[str, Any] = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    ids["vocab_size"] = vocab_size
    shape = {  # hidden 64, 2 layers, 4 heads, as tiny_model's
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
        **ids,
    }
    llama_like = {**shape, "intermediate_size": 128, "num_key_value_heads": 2}
    opt = {**shape, "ffn_dim": 128, "word_embed_proj_dim": 64}
    return {
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **ids),
        # GPT-1: no cache at all, every position computed each time
        "openai_gpt": lambda: tf.OpenAIGPTConfig(
            n_embd=64, n_layer=2, n_head=4, n_positions=256, **ids
        ),
        # XLM as a causal LM: its forward takes a `cache` (a dict of its own) and returns none
        "xlm": lambda: tf.XLMConfig(emb_dim=64, n_layers=2, n_heads=4, causal=True, **ids),
        "opt": lambda: tf.OPTConfig(**opt),
        # OPT-350m's kind: post-norm layers, no final norm, embeddings narrower than the
        # residual stream (project_in / project_out)
        "opt_proj": lambda: tf.OPTConfig(
            **{**opt, "word_embed_proj_dim": 32, "do_layer_norm_before": False}
        ),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**shape, intermediate_size=128),
        "qwen2": lambda: tf.Qwen2Config(**llama_like),
        "qwen3": lambda: tf.Qwen3Config(**llama_like, head_dim=16),  # per-head q/k norms
        "cohere": lambda: tf.CohereConfig(**llama_like),  # a LayerNorm named like an RMSNorm
        "phi": lambda: tf.PhiConfig(**llama_like),  # `final_layernorm`
        "gemma": lambda: tf.GemmaConfig(**{**llama_like, "num_key_value_heads": 1}),
        "mistral": lambda: tf.MistralConfig(**llama_like, sliding_window=WINDOW),
        "gemma2": lambda: tf.Gemma2Config(**llama_like, head_dim=16, sliding_window=WINDOW),
        "bloom": lambda: tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **ids),
        **_recurrent_configs(ids, llama_like),
        # mixtures of experts, each projection one 3-D parameter: (experts, out, in), and
        # GPT-OSS's (experts, in, out) (`is_transposed`)
        "mixtral": lambda: tf.MixtralConfig(**llama_like, num_local_experts=3),
        "gpt_oss": lambda: tf.GptOssConfig(
            **{**llama_like, "intermediate_size": 64},
            head_dim=16,
            num_local_experts=3,
            num_experts_per_tok=2,
            # YaRN's factor (32) as the context over its original, as transformers checks
            rope_parameters={
                **(tf.GptOssConfig().rope_parameters or {}),
                "original_max_position_embeddings": 8,
            },
        ),
        # Llama 4's text model: experts beside a shared MLP, attention in chunks of
        # WINDOW tokens, and a base_model_prefix that names no attribute
        "llama4_text": lambda: tf.Llama4TextConfig(
            **llama_like,
            head_dim=16,
            num_local_experts=3,
            intermediate_size_mlp=128,
            attention_chunk_size=WINDOW,
        ),
        **_gemma_configs(llama_like),
    }


def _gemma_configs(llama_like: dict[str, Any]) -> dict[str, Any]:
    """`tiny_other`'s Gemma 3, 3n and 4 models, each made when called."""
    import transformers as tf

    vocab_size = llama_like["vocab_size"]
    return {
        # Gemma 4's text model: per-layer token embeddings beside the residual stream,
        # sliding and full attention (transformers 5.5 and later)
        "gemma4_text": lambda: tf.Gemma4TextConfig(
            **llama_like,
            head_dim=16,
            vocab_size_per_layer_input=vocab_size,
            hidden_size_per_layer_input=16,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],  # the last full, as required
        ),
        # Gemma 3n's text model: each layer carries parallel streams (AltUp), no one
        # residual stream for the hidden-state attacks and RMU to read
        "gemma3n_text": lambda: tf.Gemma3nTextConfig(
            **llama_like,
            head_dim=16,
            vocab_size_per_layer_input=vocab_size,
            hidden_size_per_layer_input=16,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            num_kv_shared_layers=0,
            laurel_rank=8,
            activation_sparsity_pattern=[0.0, 0.0],
        ),
        # Gemma 3 from 4B: a vision-language model whose text part is a `language_model`
        "gemma3_vl": lambda: tf.Gemma3Config(
            text_config={**llama_like, "head_dim": 16, "sliding_window": WINDOW},
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 28,
                "patch_size": 14,
            },
            mm_tokens_per_image=4,
        ),
    }


def _recurrent_configs(ids: dict[str, Any], llama_like: dict[str, Any]) -> dict[str, Any]:
    """`tiny_other`'s models with state-space and linear-attention layers: a recurrent
    state, no keys and values."""
    import transformers as tf

    mamba_heads: dict[str, Any] = {"mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16}
    linear_heads: dict[str, Any] = {"linear_num_value_heads": 4, "linear_num_key_heads": 2}
    linear_dims: dict[str, Any] = {"linear_key_head_dim": 16, "linear_value_head_dim": 16}
    experts: dict[str, Any] = {"num_experts": 3, "num_experts_per_tok": 2}
    return {
        "mamba": lambda: tf.MambaConfig(hidden_size=64, num_hidden_layers=2, **ids),
        "rwkv": lambda: tf.RwkvConfig(
            hidden_size=64,
            num_hidden_layers=2,
            attention_hidden_size=64,
            intermediate_size=128,
            **ids,
        ),
        # attention and Mamba heads side by side; it multiplies the embeddings it looks up
        # (on the input_ids path only) and its logits
        "falcon_h1": lambda: tf.FalconH1Config(
            **llama_like,
            **mamba_heads,
            mamba_d_state=8,
            mamba_n_groups=1,
            embedding_multiplier=2.0,
            lm_head_multiplier=0.5,
        ),
        # two recurrent blocks, then local attention (its layout); soft-capped logits
        "recurrent_gemma": lambda: tf.RecurrentGemmaConfig(
            **{k: v for k, v in llama_like.items() if k != "max_position_embeddings"}
            | {"num_hidden_layers": 3},
            lru_width=64,
            attention_window_size=16,
        ),
        "qwen3_next": lambda: tf.Qwen3NextConfig(
            **{**llama_like, "num_hidden_layers": 4},  # 3 linear-attention layers, 1 full
            head_dim=16,
            **linear_heads,
            **linear_dims,
            **experts,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        ),
    }


def keyword_spans_one_pattern(text: str, keyword: str) -> list[tuple[int, int]]:
    """`unpact.data.items.keyword_spans` the obvious, slow way (the tests' reference, the
    benchmark's alternative): one regular expression per keyword, its letters with a class
    of optional marks and invisible characters between them (and after the last, for
    Arabic and Hebrew), searched in the text as it is."""
    letters = [c for c in keyword if not (optional_mark(c) or invisible(c))]
    if not letters:
        return []
    skip = skippable_class() + "*"
    pattern = skip.join(map(re.escape, letters)) + (skip if any(map(takes_marks, letters)) else "")
    found = re.finditer(f"(?=({pattern}))", text, re.IGNORECASE)
    return [(m.start(1), m.end(1)) for m in found]
