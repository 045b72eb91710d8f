"""unpact: tell whether a language model has really forgotten what it was made to unlearn."""

from unpact.errors import UnpactError
from unpact.models import EncodedPrompt, LanguageModel, load_model, open_model
from unpact.scoring import AnswerScore, Generation, answer_logprobs, generate, score

__version__ = "0.1.0"

__all__ = [
    "AnswerScore",
    "EncodedPrompt",
    "Generation",
    "LanguageModel",
    "UnpactError",
    "__version__",
    "answer_logprobs",
    "generate",
    "load_model",
    "open_model",
    "score",
]
