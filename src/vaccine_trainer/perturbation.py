"""The method itself, without any Trainer: capture hidden-state gradients, build eps, add eps.

One set of forward hooks is registered on the perturbed modules and switched by state
(off / capture / perturb) rather than added and removed every pass: `torch.compile` ignores hooks
registered after its first call, so the hooks must exist before it and never change. Every hook
counts its calls, so a pass in which a hook did not run is an error, never a silent plain step.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .checkpointing import checkpoint_function, setting

Perturbation = list["torch.Tensor | None"]
LOSS_SCALE_OVERFLOW = "loss-scale overflow"  # the skip reason of a pass 1 whose scaled gradient overflowed fp16


class HookNotCalledError(RuntimeError):
    """A perturbed module's hook did not run (e.g. hooks added after `torch.compile`)."""


class MissingHiddenStateGradientError(RuntimeError):
    """A hook ran in pass 1 but the loss has no gradient with respect to its output: never a silent plain step."""


@dataclass
class PerturbationResult:
    """What pass 1 produced: eps per module (None: leave the output alone) and its diagnostics."""

    eps: Perturbation | Callable[[torch.Tensor], torch.Tensor]  # a noise function for the gaussian ablation
    grad_norm: float
    skipped_reason: str | None = None
    eps_norms: list[float | None] | None = None  # the norm each eps_l has in exact arithmetic (None: no eps)


def hidden_output(output) -> torch.Tensor:
    """The hidden-state tensor of a module output: the tensor itself or the first tuple item."""
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(
            f"Vaccine can only perturb modules that return a tensor or a tuple starting with one, got "
            f"{type(hidden).__name__}. Choose other modules with `vaccine_modules`."
        )
    return hidden


def _replace_hidden(output, hidden: torch.Tensor):
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


def sum_dtype(hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.dtype:
    """The dtype `hidden + eps` is computed and returned in: the module's input stream's where it is wider.

    Under autocast with fp32 weights (the Trainer's `bf16=True`), an attention block takes the fp32 residual stream
    and returns bf16; adding eps in bf16 rounds most of it away where the hidden state is large. The residual add
    that follows promotes to fp32 anyway, so returning the sum in fp32 keeps eps whole and changes no dtype
    downstream. With bf16 weights the stream is bf16 and the sum stays bf16.
    """
    for candidate in (*args[:1], kwargs.get("hidden_states")):
        if (isinstance(candidate, torch.Tensor) and candidate.is_floating_point()
                and candidate.shape == hidden.shape and hidden.is_floating_point()
                and torch.finfo(candidate.dtype).bits > torch.finfo(hidden.dtype).bits):
            return candidate.dtype
    return hidden.dtype


def run_eagerly(hook: Callable) -> Callable:
    """`hook` as a graph break of `torch.compile`, run in eager mode.

    Traced into a compiled graph (AOTAutograd: aot_eager, inductor), a captured output is a sibling output of
    one compiled autograd node, with no path from the loss to it, and `autograd.grad` finds no gradient. At a
    graph break it is an input of the next graph, so the loss depends on it as in eager mode; and the
    off / capture / perturb switch is never guarded on, so switching it recompiles nothing.
    """
    return torch.compiler.disable(hook)


class HiddenStateHooks:
    """Forward hooks on `modules` that capture (pass 1) or perturb (pass 2) their outputs."""

    OFF, CAPTURE, PERTURB = "off", "capture", "perturb"

    def __init__(self, modules: Sequence[nn.Module]):
        if not modules:
            raise ValueError("Vaccine needs at least one module to perturb.")
        self.modules = list(modules)
        self.mode = self.OFF
        self._handles: list = []
        self.calls = [0] * len(self.modules)
        self.outputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self.gradients: list[torch.Tensor | None] = [None] * len(self.modules)
        self.applied: list[torch.Tensor | None] = [None] * len(self.modules)
        self.gradient_hooks = False  # capturing through tensor hooks in a full backward (reentrant checkpointing)
        self._eps: Perturbation | Callable[[torch.Tensor], torch.Tensor] | None = None
        self.active: list[bool] | None = None  # T-Vaccine: only these modules capture and perturb (None: all)

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> None:
        if not self._handles:
            self._handles = [
                module.register_forward_hook(run_eagerly(functools.partial(self._hook, index)), with_kwargs=True)
                for index, module in enumerate(self.modules)
            ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._reset(self.OFF)

    @contextlib.contextmanager
    def installed_for(self) -> Iterator[None]:
        """Install the hooks for the duration of the block unless they already are."""
        if self.installed:
            yield
            return
        self.install()
        try:
            yield
        finally:
            self.remove()

    def _reset(self, mode: str) -> None:
        self.mode = mode
        self.calls = [0] * len(self.modules)
        self.outputs = [None] * len(self.modules)
        self.gradients = [None] * len(self.modules)
        self.applied = [None] * len(self.modules)
        self._eps = None

    @contextlib.contextmanager
    def restricted_to(self, active: Sequence[bool] | None) -> Iterator[None]:
        """Only the modules marked True capture and perturb during the block (T-Vaccine); None: every module."""
        self.active = list(active) if active is not None else None
        try:
            yield
        finally:
            self.active = None

    @contextlib.contextmanager
    def capturing(self, gradient_hooks: bool = False) -> Iterator[HiddenStateHooks]:
        """Record each module's output; with `gradient_hooks`, also record its gradient in backward.

        `gradient_hooks` is the path for reentrant checkpointing, where `torch.autograd.grad` is
        refused and the gradients must be caught by tensor hooks during a full `backward()`.
        """
        self._reset(self.CAPTURE)
        self.gradient_hooks = gradient_hooks
        try:
            yield self
        finally:
            self._reset(self.OFF)

    @contextlib.contextmanager
    def perturbing(self, eps: Perturbation | Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Add `eps[i]` (or `eps(hidden)` for a noise function) to each module's output.

        Stays on until the block ends, so the recompute of checkpointed layers in backward sees the
        same perturbation as the forward. Read `applied_norm()` inside the block.
        """
        self._reset(self.PERTURB)
        self._eps = eps
        try:
            yield
        finally:
            self._reset(self.OFF)

    def kept_fraction_median(self, eps_norms: Sequence[float | None]) -> torch.Tensor | None:
        """Median over the perturbed outputs of (norm really added) / (norm of eps): what rounding left, layer by
        layer. The global `applied_norm` can hide it: the global norm puts most of rho on a few layers."""
        pairs = [(sq, n) for sq, n in zip(self.applied, eps_norms) if sq is not None and n]
        if not pairs:
            return None
        added = torch.stack([sq for sq, _ in pairs]).sqrt()
        return (added / torch.tensor([n for _, n in pairs], device=added.device)).median()

    def applied_norm(self) -> torch.Tensor | None:
        """L2 norm, over every perturbed output, of what the hooks really added: `(e + eps) - e` after rounding.

        In bf16 or fp16 adding a small eps to a large hidden state rounds part of it away, so this can be well
        below rho. A 0-dim fp32 tensor (no host sync); None when nothing was added.
        """
        present = [sq for sq in self.applied if sq is not None]
        return torch.stack(present).sum().sqrt() if present else None

    def check_called(self, expected: Sequence[bool] | None = None) -> None:
        """Raise if a hook that should have run did not (by default: every active module's)."""
        if expected is None:
            expected = self.active if self.active is not None else [True] * len(self.modules)
        missing = [i for i, (want, n) in enumerate(zip(expected, self.calls)) if want and n == 0]
        if missing:
            raise HookNotCalledError(
                f"Vaccine's hooks on {len(missing)} module(s) (indices {missing}) did not run in the "
                f"{self.mode} pass, so the step would silently train without perturbation. This happens "
                "when a model was compiled or wrapped before the hooks were added; pass the uncompiled "
                "model to the trainer (use `torch_compile=True` in the arguments) or check `vaccine_modules`."
            )

    def _hook(self, index: int, module: nn.Module, args, kwargs, output):
        if self.mode == self.OFF or (self.active is not None and not self.active[index]):
            return None
        hidden = hidden_output(output)
        self.calls[index] += 1
        if self.mode == self.CAPTURE:
            self._capture(index, hidden)
            return None
        eps = self._eps(hidden) if callable(self._eps) else self._eps[index]
        if eps is None:
            return None
        if eps.shape != hidden.shape:
            raise RuntimeError(
                f"Perturbation of shape {tuple(eps.shape)} does not fit the output of shape "
                f"{tuple(hidden.shape)}: the batch changed between the two passes."
            )
        wide = sum_dtype(hidden, args, kwargs)
        perturbed = hidden + eps if wide == hidden.dtype else hidden.to(wide) + eps.to(wide)
        if self.applied[index] is None:  # a recompute under checkpointing adds the same eps again
            with torch.no_grad():  # one fp32 copy, freed at once; the difference of bf16/fp16 values is exact in it
                added = perturbed.to(torch.float32, copy=True).sub_(hidden)
                self.applied[index] = torch.linalg.vector_norm(added).square()
        return _replace_hidden(output, perturbed)

    def _capture(self, index: int, hidden: torch.Tensor) -> None:
        # A second call is the recompute of a checkpointed layer: the first output is the one in the
        # graph (non-reentrant), or the first call ran without grad (reentrant) and this one counts.
        if self.outputs[index] is not None or not torch.is_grad_enabled():
            return
        if not hidden.requires_grad:
            if hidden.grad_fn is not None:
                return
            hidden.requires_grad_(True)  # nothing below requires grad: make the output a leaf
        self.outputs[index] = hidden
        if self.gradient_hooks:
            def store(grad: torch.Tensor, index: int = index) -> None:
                self.gradients[index] = grad if self.gradients[index] is None else self.gradients[index] + grad

            hidden.register_hook(store)


def checkpointed_modules(model: nn.Module, training_only: bool = True) -> Iterator[nn.Module]:
    """The modules of `model` that run under activation checkpointing (in training mode only, by default)."""
    for module in model.modules():
        if setting(module) is True and (module.training or not training_only):
            yield module


def uses_reentrant_checkpointing(model: nn.Module, training_only: bool = True) -> bool:
    """True when a module of `model` is checkpointed with `use_reentrant=True` (or torch's default), by its settings.

    Reentrant checkpointing rejects `torch.autograd.grad`, so pass 1 must use a full backward. Checkpointing acts in
    training mode only; `training_only=False` asks about the set-up instead. A checkpoint function that runs
    reentrant whatever its settings say (Unsloth's, Axolotl's offloading) is found by the step itself, at its first
    pass 1.
    """
    for module in checkpointed_modules(model, training_only):
        keywords = getattr(checkpoint_function(module), "keywords", None) or {}
        if keywords.get("use_reentrant") is not False:
            return True
    return False


def hidden_state_gradients(
    loss: torch.Tensor,
    hooks: HiddenStateHooks,
    trainable_parameters: Sequence[torch.Tensor] = (),
) -> list[torch.Tensor | None]:
    """dL/de_l for every captured output, without changing any parameter's `.grad`.

    The normal path is `torch.autograd.grad`, which touches no `.grad` and prunes the graph below
    the lowest captured output. With gradient hooks (reentrant checkpointing) a full `backward()`
    runs instead; the parameters' `.grad` are stashed before and restored after. A module whose hook ran
    but whose output got no gradient raises `MissingHiddenStateGradientError`: never a silent plain step.
    """
    result: list[torch.Tensor | None] = [None] * len(hooks.modules)
    if not hooks.gradient_hooks:
        wanted = [i for i, out in enumerate(hooks.outputs) if out is not None]
        if wanted:
            grads = torch.autograd.grad(loss, [hooks.outputs[i] for i in wanted], allow_unused=True)
            for i, grad in zip(wanted, grads):
                result[i] = grad
    else:
        stashed = [p.grad for p in trainable_parameters]
        for p in trainable_parameters:
            p.grad = None
        try:
            loss.backward()
        finally:
            for p, grad in zip(trainable_parameters, stashed):
                p.grad = grad
        result = list(hooks.gradients)
    missing = [i for i, calls in enumerate(hooks.calls) if calls and result[i] is None]
    if missing:
        raise MissingHiddenStateGradientError(
            f"Vaccine's hooks on {len(missing)} module(s) (indices {missing}) ran in pass 1, but the loss has no "
            "gradient with respect to their outputs, so the step cannot be perturbed. This happens when a "
            "compiler traces the hooks into its graph (pass the uncompiled model and set `torch_compile=True`), "
            "when pass 1 runs with gradients disabled, or when the chosen modules do not feed the loss "
            "(check `vaccine_modules`)."
        )
    return result


def skip_reason(global_norm: float, any_gradient: bool) -> str | None:
    """Why pass 1's gradient cannot be normalised into eps (the step then trains on the clean loss), or None."""
    if not any_gradient:
        return "no hidden-state gradient (outputs unused by the loss)"
    if not math.isfinite(global_norm):
        return "non-finite hidden-state gradient"
    if global_norm == 0.0:
        return "zero hidden-state gradient"
    return None


def token_norms(hidden: torch.Tensor) -> torch.Tensor:
    """||h_t|| of every token of a hidden-state tensor, in fp32, shaped to broadcast over the hidden size."""
    return torch.linalg.vector_norm(hidden.detach(), dim=-1, keepdim=True, dtype=torch.float32)


def build_perturbation(
    gradients: Sequence[torch.Tensor | None],
    rho: float,
    norm: str = "global",
    hidden_norms: Sequence[torch.Tensor | None] | None = None,
) -> PerturbationResult:
    """eps_l from g_l = dL/de_l, by one of three norms.

    - `"global"` (the paper): eps_l = rho * g_l / ||g||, one norm over every layer of the micro-batch.
    - `"layer"`: eps_l = rho * g_l / ||g_l||, every layer's eps of norm rho.
    - `"relative"`: eps_{l,t} = rho * ||h_{l,t}|| * g_{l,t} / ||g_{l,t}||, every token of every layer pushed by the
      fraction rho of its own size; `hidden_norms` gives ||h_{l,t}|| (`token_norms` of the outputs of pass 1).
      A token whose gradient is zero (padding, positions after the last label) stays unperturbed.

    Norms are taken in fp32 and eps has each gradient's dtype. With `"layer"` a layer whose gradient is zero (the
    loss does not depend on it) stays unperturbed.
    """
    if norm == "relative" and (hidden_norms is None or len(hidden_norms) != len(gradients)):
        raise ValueError(
            "vaccine_norm='relative' needs the norms of the hidden states (`hidden_norms`), one per layer.")
    present = [g for g in gradients if g is not None]
    if not present:
        return PerturbationResult([None] * len(gradients), 0.0, skip_reason(0.0, False))
    device = present[0].device
    sizes = [torch.linalg.vector_norm(g, dtype=torch.float32).to(device) for g in present]
    token_factors: list[torch.Tensor | None] = [None] * len(gradients)
    if norm == "relative":
        for index, (g, h_norm) in enumerate(zip(gradients, hidden_norms)):
            if g is None:
                continue
            g_norm = torch.linalg.vector_norm(g, dim=-1, keepdim=True, dtype=torch.float32)
            # rho * ||h_t|| / ||g_t|| where g_t is non-zero, 0 where it is zero
            token_factors[index] = torch.where(g_norm > 0, rho * h_norm.to(g_norm.device) / g_norm, 0.0)
            sizes.append(torch.linalg.vector_norm(token_factors[index] * g_norm).to(device))  # ||eps_l||
    synced = torch.stack(sizes).tolist()  # the one host sync of the step
    layer_norms = [synced.pop(0) if g is not None else None for g in gradients]
    global_norm = math.sqrt(sum(n * n for n in layer_norms if n is not None))
    reason = skip_reason(global_norm, True)
    if norm == "relative":  # a layer whose eps is zero (no token with a gradient) stays unperturbed
        eps_norms = [synced.pop(0) if g is not None else None for g in gradients]
        if reason is None and not all(math.isfinite(n) for n in eps_norms if n is not None):
            reason = "non-finite hidden state"
        eps_norms = [n or None for n in eps_norms]
        scales = [f if n else None for f, n in zip(token_factors, eps_norms)]
    else:  # per layer, a layer whose gradient is zero stays unperturbed
        denominators = [global_norm if norm == "global" else n for n in layer_norms]
        eps_norms = [rho * n / d if n is not None and d else None for n, d in zip(layer_norms, denominators)]
        scales = [rho / d if n is not None and d else None for n, d in zip(layer_norms, denominators)]
    if reason is not None:
        return PerturbationResult([None] * len(gradients), global_norm, reason)
    # eps = g * scale, in place: pass 1's gradient is ours to overwrite (no second hidden-sized copy), and for
    # bf16/fp16 the product is computed in fp32 and rounded once.
    eps: Perturbation = [None if scale is None else g.mul_(scale) for g, scale in zip(gradients, scales)]
    return PerturbationResult(eps, global_norm, eps_norms=eps_norms)


def gaussian_noise(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Noise function for the random-perturbation ablation: N(0, std^2) drawn in fp32."""

    def noise(hidden: torch.Tensor) -> torch.Tensor:
        return (torch.randn(hidden.shape, device=hidden.device, dtype=torch.float32) * std).to(hidden.dtype)

    return noise
