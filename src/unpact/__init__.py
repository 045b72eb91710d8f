"""unpact: tell whether a language model has really forgotten what it was made to unlearn."""

from unpact import determinism

determinism.set_environment()  # before torch's first use of MKL (see unpact.determinism)


def _quiet_libraries() -> None:
    """torchao (the quantize attack's library, which transformers imports when installed)
    logs a warning per CUDA kernel it cannot load on a CPU machine and per Enum it registers
    with torch.compile; bitsandbytes, which peft imports whenever it is installed (every
    LoRA of unpact's), one for the CPU kernel it cannot fetch from the hub, and the
    `kernels` package one for the hub check it skips offline: none of it concerns unpact's
    users. Left alone if the user set a level on those loggers. Nor does the hub library's
    notice that $HF_HUB_ENABLE_HF_TRANSFER no longer does anything.

    torchao 0.18's quant_api.py has an invalid escape in a docstring, which Python 3.12 and
    later report (SyntaxWarning) whenever they compile the file: at each import where no
    bytecode was written at install (uv installs without it), seen on a GPU machine."""
    import logging
    import warnings

    for name in ("torchao", "torch.utils._pytree", "bitsandbytes", "kernels"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)
    # a compiler's warning has the file's path (less ".py") as its module
    warnings.filterwarnings("ignore", category=SyntaxWarning, module=r".*[/\\]torchao[/\\]")
    # the hub library's notice, at its import, that $HF_HUB_ENABLE_HF_TRANSFER (set on many
    # clusters by older advice) no longer does anything: about the user's environment, not
    # unpact's downloads, and printed before every command's output
    warnings.filterwarnings(
        "ignore", message="The `HF_HUB_ENABLE_HF_TRANSFER` environment variable is deprecated"
    )


_quiet_libraries()

from unpact.backends import open_model  # noqa: E402
from unpact.errors import NotForThisModel, UnpactError  # noqa: E402
from unpact.models import (  # noqa: E402
    LanguageModel,
    load_model,
    trusting_remote_code,
    with_chat_template,
)
from unpact.scoring import AnswerScore, Generation, answer_logprobs, generate, score  # noqa: E402
from unpact.types import Backend, EncodedPrompt  # noqa: E402

if not determinism.ensure():  # also when torch was imported (and MKL used) first
    import warnings

    warnings.warn(
        "MKL already ran in a mode whose float32 results depend on the thread count; for "
        "bit-reproducible training import unpact before using torch, or set "
        "MKL_CBWR=AUTO,STRICT",
        stacklevel=2,
    )

determinism.start_threads()  # before any forward pass, after MKL's mode (unpact.determinism)

__version__ = "0.1.0"

__all__ = [
    "AnswerScore",
    "Backend",
    "EncodedPrompt",
    "Generation",
    "LanguageModel",
    "NotForThisModel",
    "UnpactError",
    "__version__",
    "answer_logprobs",
    "generate",
    "load_model",
    "open_model",
    "score",
    "trusting_remote_code",
    "with_chat_template",
]
