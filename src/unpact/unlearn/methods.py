"""Unlearning methods: each one is its loss (SPEC section 6); the loop in `loop.py` is shared.

A method is a small subclass of `Method` with a `name` (it registers itself), a pydantic
`Settings` model for its own knobs, the frozen reference it needs (`reference`), and
`losses(ctx)`: a dict of named loss terms whose weighted sum is minimised. Adding a method
is one class here (or anywhere imported before the run) plus its defaults file in
`configs/` and a test.

All terms are means over items (each item's own term first averaged over its tokens where
the paper's loss is per token): split a global batch evenly over processes and the mean
of the processes' gradients is exactly the gradient of the global batch's loss, which is
what lets `accelerate` scale the loop out without changing a curve.

References (`references`, a method may need several), computed once from the model as
it is before unlearning:
- `"logprobs"`: each forget item's summed answer log-prob (NPO, SimNPO keep no second
  model in memory for it);
- `"model"`: a frozen copy of the model (the KL regulariser needs full distributions);
- `"activations"`: RMU's frozen layer-l activations of the retain items.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from unpact.attribution import ALPHA, BETA, key_tokens
from unpact.errors import UnpactError
from unpact.plugins import check_name as _check_name
from unpact.plugins import check_overrides as _check_overrides
from unpact.scoring import (
    answer_distributions,
    answer_logprobs,
    decoder_layers,
    layer_output,
    lm_body_and_head,
    mlp_parameter,
    right_padded,
)
from unpact.types import Seed, SettingsModel

Reference = Literal["logprobs", "model", "activations"]
METHODS: dict[str, type[Method]] = {}


@dataclass(frozen=True)
class Batch:
    """Some QA items as token ids: chat-formatted prompts and answers ending in EOS.

    `content` gives, per item, the (start, end) of the positions that are the item's own
    text (question and answer, not the chat template's system turn): RMU steers those."""

    ids: tuple[str, ...]
    prompts: tuple[tuple[int, ...], ...]
    answers: tuple[tuple[int, ...], ...]
    content: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class StepContext:
    """What a method's loss may look at in one step."""

    model: Any  # the policy being unlearned (possibly wrapped by accelerate / peft)
    forget: Batch
    retain: Batch
    step: int
    reference: Any = None  # frozen model, when the method asked for "model"
    forget_ref_logprobs: dict[str, float] = field(default_factory=dict)
    retain_ref_activations: dict[str, torch.Tensor] = field(default_factory=dict)


class MethodSettings(SettingsModel):
    """Base of every method's settings: unknown keys are errors."""


class Method:
    """An unlearning method. Subclasses set `name`, `Settings`, `references`, `losses`."""

    name: ClassVar[str] = ""
    Settings: ClassVar[type[MethodSettings]] = MethodSettings
    references: ClassVar[tuple[Reference, ...]] = ()
    uses_retain: ClassVar[bool] = False
    summary: ClassVar[str] = ""

    def __init__(self, settings: MethodSettings | None = None) -> None:
        self.settings = settings or self.Settings()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_overrides(cls, Method, "method")
        if cls.name:
            _check_name(METHODS, cls, "method")
            METHODS[cls.name] = cls

    def losses(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Named, already weighted loss terms; the loop minimises their sum."""
        raise NotImplementedError

    def trainable(self, name: str) -> bool:
        """Which parameters this method updates (all, by default)."""
        return True

    def finalize(self, model: Any, original: dict[str, torch.Tensor]) -> None:
        """Change the trained weights in place once training ends (Task Vector)."""

    def prepare(self, lm: Any, forget: dict[str, Any]) -> None:
        """Look at the model before any step (e.g. attribute the forget set); `forget`
        holds the encoded forget items (`ids`, `prompts`, `answers`, `encoded`)."""

    def check_depth(self, layers: int) -> None:
        """Refuse settings that name a decoder layer a model of `layers` layers does not
        have (RMU's `layer`), before anything is trained."""


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise UnpactError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    return METHODS[name]


# --------------------------------------------------------------------------- loss pieces


def token_logprobs(model: Any, batch: Batch) -> list[torch.Tensor]:
    """Per item, log p(answer token | prompt, earlier answer tokens), with gradients."""
    return answer_logprobs(model, batch.prompts, batch.answers, grad=True)


def nll(model: Any, batch: Batch) -> torch.Tensor:
    """Mean over items of the item's mean answer-token negative log-likelihood."""
    return torch.stack([-lp.mean() for lp in token_logprobs(model, batch)]).mean()


def sequence_logprobs(model: Any, batch: Batch) -> torch.Tensor:
    """Per item, the summed answer log-prob log p(y | x) (NPO's quantity)."""
    return torch.stack([lp.sum() for lp in token_logprobs(model, batch)])


def kl_to_reference(model: Any, reference: Any, batch: Batch) -> torch.Tensor:
    """Mean over items of the mean over answer positions of KL(p_ref || p_theta), over
    the whole vocabulary."""
    with torch.no_grad():
        ref = answer_distributions(reference, batch.prompts, batch.answers)
    cur = answer_distributions(model, batch.prompts, batch.answers, grad=True)
    ref = [r.to(c.device) for r, c in zip(ref, cur)]  # FSDP/DeepSpeed: the copy stays on the CPU
    per_item = [(r.exp() * (r - c)).sum(-1).mean() for r, c in zip(ref, cur)]
    return torch.stack(per_item).mean()


def reference_logprobs(ctx: StepContext) -> torch.Tensor:
    try:
        return torch.tensor([ctx.forget_ref_logprobs[i] for i in ctx.forget.ids])
    except KeyError as e:
        raise UnpactError(f"no reference log-prob for forget item {e}") from None


class _Retain(MethodSettings):
    retain_weight: float = Field(1.0, ge=0, description="weight of the retain regulariser")


def _retain_terms(ctx: StepContext, kind: str, weight: float) -> dict[str, torch.Tensor]:
    if kind == "gd":
        return {"retain_nll": weight * nll(ctx.model, ctx.retain)}
    if kind == "kl":
        return {"retain_kl": weight * kl_to_reference(ctx.model, ctx.reference, ctx.retain)}
    return {}


# --------------------------------------------------------------------------- GA family


class GA(Method):
    """Gradient ascent: minimise -NLL(D_F), i.e. push the forget answers' log-probs down."""

    name = "ga"
    summary = "gradient ascent on the forget set"
    retain_kind: ClassVar[str] = "none"

    class Settings(_Retain):
        pass

    def losses(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        terms = {"forget_ga": -nll(ctx.model, ctx.forget)}
        assert isinstance(self.settings, _Retain)
        return terms | _retain_terms(ctx, self.retain_kind, self.settings.retain_weight)


class GAGD(GA):
    """GA plus gradient descent on the retain set: -NLL(D_F) + w * NLL(D_R)."""

    name = "ga_gd"
    summary = "gradient ascent + retain NLL"
    retain_kind = "gd"
    uses_retain = True


class GAKL(GA):
    """GA plus KL(p_orig || p_theta) on the retain answers."""

    name = "ga_kl"
    summary = "gradient ascent + KL to the original on retain"
    retain_kind = "kl"
    uses_retain = True
    references = ("logprobs", "model")


# --------------------------------------------------------------------------- NPO family


class _NPOSettings(_Retain):
    beta: float = Field(0.1, gt=0, description="inverse temperature b of NPO")


class NPO(Method):
    """Negative preference optimisation (Zhang et al. 2024):
    `-(2/b) * mean log sigmoid(-b * (log p_theta(y|x) - log p_ref(y|x)))` on the forget
    set, with *summed* answer log-probs of the policy and the frozen reference (one public
    implementation compared raw logits instead; `tests/unit/test_unlearn.py` checks a
    hand-computed value)."""

    name = "npo"
    summary = "negative preference optimisation"
    Settings = _NPOSettings
    references: ClassVar[tuple[Reference, ...]] = ("logprobs",)
    retain_kind: ClassVar[str] = "none"

    def losses(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        s = self.settings
        assert isinstance(s, _NPOSettings)
        lp = sequence_logprobs(ctx.model, ctx.forget)
        ratio = lp - reference_logprobs(ctx).to(lp.device)  # the model's (a GPU)
        terms = {"forget_npo": -(2 / s.beta) * F.logsigmoid(-s.beta * ratio).mean()}
        return terms | _retain_terms(ctx, self.retain_kind, s.retain_weight)


class NPOGD(NPO):
    """NPO plus the retain NLL."""

    name = "npo_gd"
    summary = "NPO + retain NLL"
    retain_kind = "gd"
    uses_retain = True


class NPOKL(NPO):
    """NPO plus KL(p_orig || p_theta) on the retain answers (a frozen model is kept for it)."""

    name = "npo_kl"
    summary = "NPO + KL to the original on retain"
    retain_kind = "kl"
    uses_retain = True
    references = ("logprobs", "model")


class _SimNPOSettings(_Retain):
    beta: float = Field(2.5, gt=0, description="inverse temperature")
    gamma: float = Field(0.0, ge=0, description="reward margin")


class SimNPO(Method):
    """SimNPO (Fan et al. 2024), reference-free: `-(2/b) * mean log sigmoid(-(b/|y|) *
    log p_theta(y|x) - gamma)` on the forget set (length-normalised log-prob), plus the
    retain NLL weighted by `retain_weight` (0 turns it off)."""

    name = "simnpo"
    summary = "reference-free, length-normalised NPO + retain NLL"
    Settings = _SimNPOSettings
    uses_retain = True

    def losses(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        s = self.settings
        assert isinstance(s, _SimNPOSettings)
        lps = token_logprobs(ctx.model, ctx.forget)
        avg = torch.stack([lp.mean() for lp in lps])
        terms = {"forget_simnpo": -(2 / s.beta) * F.logsigmoid(-s.beta * avg - s.gamma).mean()}
        if s.retain_weight:
            terms["retain_nll"] = s.retain_weight * nll(ctx.model, ctx.retain)
        return terms


# ---------------------------------------------------------------- KeyToken-weighted NPO


class _KeyTokenSettings(MethodSettings):
    beta: float = Field(1.0, gt=0, description="inverse temperature of the per-token NPO loss")
    gamma: float = Field(
        1.0,
        ge=0,
        description="sharpness: a token's weight is (its key routing / the mean routing) "
        "** gamma; 0 weighs every token alike (plain per-token NPO)",
    )
    max_weight: float = Field(5.0, gt=0, description="cap on one token's weight")
    unit: Literal["token", "word"] = Field("token", description="attribution unit")
    keytoken_alpha: float = Field(ALPHA, gt=0, lt=1, description="KeyToken rule alpha")
    keytoken_beta: float = Field(BETA, gt=0, le=1, description="KeyToken rule beta")
    retain_weight: float = Field(1.0, ge=0, description="weight of the retain regulariser")


class KeyTokenNPO(Method):
    """KeyToken-weighted unlearning (SPEC section 6, beyond the paper): NPO per answer
    token, each token weighted by how much the original model routes it through the
    prompt's KeyTokens.

    Before training, unPact on every forget item under the original model gives, per
    prompt unit i and answer token k, `c_ik = log p(y_k | x, y_<k) - log p(y_k | x \\ x_i,
    y_<k)` (`attribution.token_contributions`) and the item's KeyTokens K (from the means
    over k). Token k's key routing is `r_k = sum_{i in K} max(c_ik, 0)` (nats): how much of
    its log-prob the KeyTokens carry. Its weight is `w_k = min(max_weight, (r_k / r_mean) **
    gamma)`, r_mean the mean routing over every answer token of the forget set, so weights
    average about 1 at gamma = 1, tokens the model predicts whatever the key tokens are
    (common words, punctuation, end of turn) get about 0, and so do items with no key focus.
    The forget loss is the mean over items of
    `(1/T) sum_k w_k * -(2/b) log sigmoid(-b (log p_theta(y_k|...) - log p_orig(y_k|...)))`;
    the retain regulariser is KL to the original (this class) or the retain NLL
    (`keytoken_npo_gd`)."""

    name = "keytoken_npo"
    summary = "per-token NPO weighted by unPact key routing + KL on retain"
    Settings = _KeyTokenSettings
    references: ClassVar[tuple[Reference, ...]] = ("model",)
    uses_retain = True
    retain_kind: ClassVar[str] = "kl"

    def __init__(self, settings: MethodSettings | None = None) -> None:
        super().__init__(settings)
        self.token_weights: dict[str, torch.Tensor] = {}
        self.reference_token_logprobs: dict[str, torch.Tensor] = {}

    def prepare(self, lm: Any, forget: dict[str, Any]) -> None:
        from unpact.attribution import token_contributions

        s = self.settings
        assert isinstance(s, _KeyTokenSettings)
        found = token_contributions(lm, forget["encoded"], forget["answers"], unit=s.unit)
        routing = {}
        for item_id, tc in zip(forget["ids"], found):
            keys = key_tokens(tc.contributions, s.keytoken_alpha, s.keytoken_beta)
            r = torch.zeros(len(tc.logprobs))
            for i in keys:
                r += torch.tensor(tc.by_unit[i]).clamp(min=0)
            routing[item_id] = r
            self.reference_token_logprobs[item_id] = torch.tensor(tc.logprobs)
        self.token_weights = key_routing_weights(routing, s.gamma, s.max_weight)

    def losses(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        s = self.settings
        assert isinstance(s, _KeyTokenSettings)
        if not self.token_weights:
            raise UnpactError("keytoken_npo: prepare() was not run before training")
        per_item = []
        for item_id, lp in zip(ctx.forget.ids, token_logprobs(ctx.model, ctx.forget)):
            ref = self.reference_token_logprobs[item_id].to(lp)
            w = self.token_weights[item_id].to(lp)
            per_token = -(2 / s.beta) * F.logsigmoid(-s.beta * (lp - ref))
            per_item.append((w * per_token).mean())
        terms = {"forget_keytoken_npo": torch.stack(per_item).mean()}
        return terms | _retain_terms(ctx, self.retain_kind, s.retain_weight)


class KeyTokenNPOGD(KeyTokenNPO):
    """KeyToken-weighted NPO plus the retain NLL."""

    name = "keytoken_npo_gd"
    summary = "per-token NPO weighted by unPact key routing + retain NLL"
    references = ()
    retain_kind = "gd"


def key_routing_weights(
    routing: dict[str, torch.Tensor], gamma: float, max_weight: float
) -> dict[str, torch.Tensor]:
    """Per item, per answer token: `min(max_weight, (r_k / mean r) ** gamma)`, the mean
    over every token of every item; all zero routing gives weight 1 only at gamma 0."""
    every = torch.cat(list(routing.values())) if routing else torch.zeros(0)
    mean = float(every.mean()) if every.numel() else 0.0
    out = {}
    for item_id, r in routing.items():
        if gamma == 0:
            out[item_id] = torch.ones_like(r)
        elif mean <= 0:
            out[item_id] = torch.zeros_like(r)
        else:
            out[item_id] = (r / mean).pow(gamma).clamp(max=max_weight)
    return out


# --------------------------------------------------------------------------- Task Vector


class _TVSettings(MethodSettings):
    alpha: float = Field(1.0, gt=0, description="how far to move against the task vector")


class TaskVector(Method):
    """Task arithmetic (Ilharco et al. 2023): fine-tune on the forget set to theta_ft, then
    return `theta - alpha * (theta_ft - theta)`: the direction that taught the forget set,
    subtracted."""

    name = "tv"
    summary = "fine-tune on forget, subtract the task vector"
    Settings = _TVSettings

    def losses(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {"forget_nll": nll(ctx.model, ctx.forget)}

    def finalize(self, model: Any, original: dict[str, torch.Tensor]) -> None:
        s = self.settings
        assert isinstance(s, _TVSettings)
        with torch.no_grad():
            # Every weight, trained or not (after merging LoRA nothing requires grad; an
            # untouched weight equals theta and stays so).
            for name, p in model.named_parameters():
                if name in original:
                    theta = original[name].to(p.device, p.dtype)
                    p.copy_(theta - s.alpha * (p - theta))


# --------------------------------------------------------------------------- RMU


class _RMUSettings(MethodSettings):
    layer: int = Field(7, ge=0, description="layer whose output is steered (0-based)")
    steering_coeff: float = Field(100.0, gt=0, description="c: norm of the target c * u")
    retain_weight: float = Field(10.0, ge=0, description="alpha: weight of the retain MSE")
    update_layers: list[int] | None = Field(
        None, description="layers whose MLPs are updated (default: layer-2 .. layer)"
    )
    seed: Seed = Field(0, description="seed of the random unit vector u")


class RMU(Method):
    """Representation misdirection (Li et al. 2024, WMDP): at layer l, push the forget
    items' activations towards `c * u` (u a fixed random unit vector) and keep the retain
    items' activations equal to the frozen model's; only the MLPs of `update_layers` are
    trained. Both terms are mean squared errors over the items' own tokens."""

    name = "rmu"
    summary = "steer layer-l activations of forget text to a random direction"
    Settings = _RMUSettings
    references = ("activations",)
    uses_retain = True

    def __init__(self, settings: MethodSettings | None = None) -> None:
        super().__init__(settings)
        self._u: torch.Tensor | None = None

    @property
    def layers(self) -> list[int]:
        s = self.settings
        assert isinstance(s, _RMUSettings)
        if s.update_layers is not None:
            return list(s.update_layers)
        return list(range(max(0, s.layer - 2), s.layer + 1))

    def check_depth(self, layers: int) -> None:
        s = self.settings
        assert isinstance(s, _RMUSettings)
        for what, index in [("layer", s.layer), *(("update_layers", i) for i in self.layers)]:
            if not 0 <= index < layers:
                raise UnpactError(
                    f"rmu: {what} {index} does not exist; the model has {layers} layers "
                    f"(0-based: set the method's `{what}` setting below {layers})"
                )

    def trainable(self, name: str) -> bool:
        # the MLP of each of those decoder blocks (`scoring.mlp_parameter`)
        return any(mlp_parameter(name, i) for i in self.layers)

    def direction(self, hidden_size: int) -> torch.Tensor:
        if self._u is None or self._u.numel() != hidden_size:
            s = self.settings
            assert isinstance(s, _RMUSettings)
            g = torch.Generator().manual_seed(s.seed)
            u = torch.rand(hidden_size, generator=g)
            self._u = u / u.norm()
        return self._u

    def losses(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        s = self.settings
        assert isinstance(s, _RMUSettings)
        forget = layer_activations(ctx.model, ctx.forget, s.layer)
        target = s.steering_coeff * self.direction(forget[0].shape[-1]).to(forget[0])
        f = torch.stack([F.mse_loss(h, target.expand_as(h)) for h in forget]).mean()
        retain = layer_activations(ctx.model, ctx.retain, s.layer)
        frozen = [ctx.retain_ref_activations[i].to(h) for i, h in zip(ctx.retain.ids, retain)]
        r = torch.stack([F.mse_loss(h, h0) for h, h0 in zip(retain, frozen)]).mean()
        return {"forget_rmu": f, "retain_rmu": s.retain_weight * r}


class _StopForward(Exception):
    pass


def layer_activations(model: Any, batch: Batch, layer: int) -> list[torch.Tensor]:
    """Per item, the output of decoder layer `layer` at the item's own positions
    (`batch.content`). The forward stops after that layer: the rest is never computed."""
    body, _ = lm_body_and_head(model)
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise UnpactError(
            f"layer {layer} does not exist; the model has {len(layers)} layers (0-based: set "
            f"the method's `layer` setting, e.g. --set layer={len(layers) // 2})"
        )
    device = next(model.parameters()).device
    ids, mask = right_padded([(*p, *a) for p, a in zip(batch.prompts, batch.answers)])
    captured: list[torch.Tensor] = []

    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        captured.append(layer_output(output))
        raise _StopForward

    handle = layers[layer].register_forward_hook(hook)
    try:
        body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    hidden = captured[0]
    return [hidden[r, a:b] for r, (a, b) in enumerate(batch.content)]
