"""Any SAE-Lens SAE or transcoder as an mxd_lens module, served as it is.

`SAELensModule(sae)` wraps a SAE-Lens `SAE` object (standard, topk, abstopk, jumprelu,
gated, matching_pursuit, `Transcoder`, `SkipTranscoder`, `JumpReLUTranscoder`,
`JumpReLUSkipTranscoder`, and any other class whose output is `decode(encode(x))`) so
that `attach`, `evaluate_many` / `mxd-lens eval`, patching, faithfulness curves and
dashboards treat its latents as units. The SAE's own `encode` / `decode` compute
everything (input processing, normalisation, b_dec subtraction, decoder-norm rescaling,
thresholds), so the module's output is SAE-Lens's own forward, bit for bit.

Where it sits is read from the SAE's metadata:

| SAE | metadata | `input_site` | attached, the module |
| --- | --- | --- | --- |
| an SAE | hook_name = `blocks.L.hook_mlp_out` | 'mlp_out' | runs the original MLP, feeds the SAE its output, returns the reconstruction |
| a transcoder | hook_name = `blocks.L.ln2.hook_normalized` (the MLP input), hook_name_out = `blocks.L.hook_mlp_out` | 'mlp_in' | maps the MLP input to its output |

Any other site (the residual stream, attention outputs, hook_z...) is a ValueError that
names the hook and what is supported: `attach` replaces an MLP, so a module must read
the MLP's input or output and produce its output.

Hooks (relative to the module, `blocks.L.mlp.` when attached): `hook_in`, `hook_latent_pre`
(the SAE's pre-activations where SAE-Lens computes them, `hook_sae_acts_pre`),
`hook_latent_acts` (the latents, dense), `hook_error`, `hook_out`. The SAE's own hook
points are bypassed inside the module (they are not the model's hooks, and the SAE
object is not a submodule: attaching it never renames or re-parents it).

Not in `mxd_lens.registry`: the registry is the table of mxd_lens's own folder formats,
and an adapter has none. Its folder is the SAE-Lens architecture's own (`save` writes
`sae.save_model`), which `mxd_lens.load` reads back through `load_saelens_folder` and
`SAE.load_from_disk` reads as it always did; registering these names would also put
mxd_lens classes into SAE-Lens's registry in place of SAE-Lens's own.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from jaxtyping import Float
from sae_lens import SAE
from sae_lens.saes.transcoder import SkipTranscoder as SAELensSkipTranscoder
from sae_lens.saes.transcoder import Transcoder as SAELensTranscoder
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mxd_lens.architectures.base import (
    Encoding,
    HookFn,
    Replacement,
    ReplacementConfig,
    ReplacementSAE,
    StepOutput,
    bypass,
    through,
)
from mxd_lens.config import dtype_name, parse_dtype
from mxd_lens.functional import TopK, skip_out

MLP_OUT_HOOK = re.compile(r"^blocks\.(\d+)\.hook_mlp_out$")
"""An SAE's hook (and a transcoder's output hook): the MLP output of block L."""
MLP_IN_HOOK = re.compile(r"^blocks\.(\d+)\.ln2\.hook_normalized$")
"""A transcoder's input hook: the MLP input of block L (after ln2)."""

LATENTS_FROM_PRE: frozenset[str] = frozenset(
    {
        "standard",
        "topk",
        "abstopk",
        "jumprelu",
        "transcoder",
        "skip_transcoder",
        "jumprelu_transcoder",
        "jumprelu_skip_transcoder",
    }
)
"""SAE-Lens architectures whose latents are a function of `hook_sae_acts_pre` alone, so
`activate(pre)` can recompute them (`collect_activations` relies on that). For the others
(gated: the gate has its own pre-activations; matching_pursuit: no pre-activations at
all) the module's pre-activation hook is its latent hook and `activate` is the identity."""

TOPK_ARCHITECTURES: frozenset[str] = frozenset({"topk", "abstopk"})
"""SAE-Lens architectures with a fixed number `cfg.k` of active latents per token."""

DEFAULT_L0_BOUND = 256
"""Default `k` of an SAE with a variable number of active latents (ReLU, JumpReLU...):
how many of its strongest latents per token sparse records keep."""

_SITES_SUPPORTED = (
    "an SAE on an MLP's output (metadata.hook_name='blocks.L.hook_mlp_out'), or a transcoder from the "
    "MLP input (hook_name='blocks.L.ln2.hook_normalized') to its output (hook_name_out='blocks.L.hook_mlp_out')"
)


@dataclass(kw_only=True)
class SAELensModuleConfig(ReplacementConfig):
    """What an `SAELensModule` knows of the SAE it wraps (read off the SAE; never saved:
    the SAE's own cfg.json is the record)."""

    d_sae: int
    """Number of latents."""
    saelens_architecture: str
    """The SAE's SAE-Lens architecture name ('jumprelu_transcoder', 'topk'...)."""
    fixed_k: bool = True
    """True when `k` is the SAE's own number of active latents (TopK). False for SAEs
    with a variable L0, where `k` only bounds how many of the strongest active latents per
    token sparse records (`collect_activations`) keep."""


class _Replace(nn.Module):
    """Stands in for `hook_sae_acts_pre`: returns the given pre-activations."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: Tensor) -> Tensor:
        return self.value


class _Capture(nn.Module):
    """Stands in for `hook_sae_acts_pre`: records what passes."""

    value: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.value = x
        return x


def saelens_site(sae: SAE) -> tuple[str, int, str, str]:
    """(input_site, layer, hook_name, hook_name_out) of a SAE-Lens SAE from its metadata,
    or a ValueError naming the hook and what mxd_lens can attach."""
    arch = sae.cfg.architecture()
    meta = sae.cfg.metadata
    hook_in = meta.get("hook_name")
    hook_out = meta.get("hook_name_out")
    transcoder = isinstance(sae, SAELensTranscoder)
    kind = "transcoder" if transcoder else "SAE"
    if not hook_in:
        raise ValueError(
            f"the SAE-Lens {arch!r} {kind} has no metadata.hook_name, so its site is unknown; set "
            f"sae.cfg.metadata.hook_name (and hook_name_out for a transcoder). Supported: {_SITES_SUPPORTED}"
        )
    if not transcoder:
        match = MLP_OUT_HOOK.match(hook_in)
        if match is None or hook_out not in (None, hook_in):
            where = repr(hook_in) if hook_out in (None, hook_in) else f"{hook_in!r} -> {hook_out!r}"
            raise ValueError(
                f"the SAE-Lens {arch!r} SAE reads {where}, which mxd_lens cannot put in place of an MLP "
                f"(attach replaces blocks.L.mlp); supported: {_SITES_SUPPORTED}. Use SAE-Lens's "
                "HookedSAETransformer for SAEs on other hooks"
            )
        return "mlp_out", int(match.group(1)), hook_in, hook_in
    match_in, match_out = MLP_IN_HOOK.match(hook_in), MLP_OUT_HOOK.match(hook_out or "")
    if match_in is None or match_out is None or match_in.group(1) != match_out.group(1):
        raise ValueError(
            f"the SAE-Lens {arch!r} transcoder maps {hook_in!r} -> {hook_out!r}, which is not one MLP's "
            f"input -> output; supported: {_SITES_SUPPORTED} (a transcoder on hook_resid_mid or hook_mlp_in "
            "reads the residual before ln2, not the MLP's input)"
        )
    return "mlp_in", int(match_in.group(1)), hook_in, hook_out


def _has_skip(sae: SAE) -> bool:
    """Whether the SAE's output is decode(encode(x)) + W_skip x (SAE-Lens adds the skip
    term in `forward`, not in `decode`), after checking that its forward is one of the
    forms the adapter reproduces."""
    forward = type(sae).forward
    if forward is SAELensSkipTranscoder.forward:
        return True
    if forward in (SAE.forward, SAELensTranscoder.forward):
        return False
    raise ValueError(
        f"{type(sae).__name__} (SAE-Lens architecture {sae.cfg.architecture()!r}) defines its own forward, so "
        "its output is not decode(encode(x)) (a TemporalSAE adds codes predicted from earlier positions) and "
        "its latents cannot be served as the units of a module"
    )


class SAELensModule(Replacement):
    """A SAE-Lens SAE or transcoder as an mxd_lens module whose units are its latents.

    The SAE's parameters are its own (shared, not copied): edits to the SAE show here and
    `.to()` moves both. Unit activations are dense (SAE-Lens computes them so), so a hook
    on `hook_latent_acts` sees every latent and decoding always uses the activations that
    left that hook. The SAE's own `use_error_term` is not used: the error term is
    `attach(..., use_error_term=True)`'s. `as_module` converts whatever `attach` is given.
    """

    cfg: SAELensModuleConfig
    config_class = SAELensModuleConfig
    architecture = "sae_lens"
    trainable = False  # SAE-Lens trains its own SAEs (mxd_lens.training.sae_lens_runner for MLP-output ones)
    pre_hook_name = "hook_latent_pre"
    acts_hook_name = "hook_latent_acts"

    def __init__(self, sae: SAE, k: int | None = None) -> None:
        """Wrap `sae`. `k`: for an SAE with a variable number of active latents, how many
        of its strongest latents per token sparse records keep (default
        min(d_sae, DEFAULT_L0_BOUND)); a TopK SAE's k is its own."""
        if isinstance(sae, ReplacementSAE):
            raise ValueError(
                f"{type(sae).__name__} is the SAE-Lens view of an mxd_lens module: convert it with "
                "mxd_lens.saelens.from_saelens (mxd_lens.architectures.saelens_adapter.as_module does)"
            )
        if not isinstance(sae, SAE):
            raise ValueError(f"expected a sae_lens SAE object, got {type(sae).__module__}.{type(sae).__name__}")
        arch = sae.cfg.architecture()
        skip = _has_skip(sae)
        input_site, layer, hook_in, hook_out = saelens_site(sae)
        d_sae = sae.cfg.d_sae
        if arch in TOPK_ARCHITECTURES:
            if k is not None and k != sae.cfg.k:
                raise ValueError(f"k={k} contradicts the {arch!r} SAE's own k={sae.cfg.k}; leave k unset")
            k, fixed = sae.cfg.k, True
        else:
            k, fixed = (min(d_sae, DEFAULT_L0_BOUND) if k is None else k), False
        param = sae.W_dec
        cfg = SAELensModuleConfig(
            d_in=sae.cfg.d_in,
            d_out=getattr(sae.cfg, "d_out", sae.cfg.d_in),
            d_sae=d_sae,
            k=k,
            fixed_k=fixed,
            saelens_architecture=arch,
            hook_name=hook_in,
            hook_name_out=hook_out,
            layer=layer,
            model_name=sae.cfg.metadata.get("model_name"),
            input_site=input_site,
            dtype=dtype_name(param.dtype),
            device=str(param.device),
        )
        # Per instance: where the latents are not a function of the pre-activations, the
        # "pre-activation" hook is the latent hook itself (so collect_activations records
        # the latents, with `activate` the identity).
        self._latents_from_pre = arch in LATENTS_FROM_PRE
        if not self._latents_from_pre:
            self.pre_hook_name = self.acts_hook_name
        # The base builds the shared four parameters; on the meta device they cost nothing,
        # and they go at once: the SAE's own parameters are the only ones.
        super().__init__(dataclasses.replace(cfg, device="meta"))
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            del self._parameters[name]
        self.cfg = cfg
        self.architecture = f"sae_lens:{arch}"
        self._skip = skip
        # Not a submodule: attaching must not rename the SAE's hook points or make them
        # model hooks that the module would then bypass.
        self.__dict__["_sae"] = sae
        self.setup()

    # --- the wrapped SAE ---------------------------------------------------------------
    @property
    def sae(self) -> SAE:
        """The wrapped SAE-Lens SAE (its parameters are this module's)."""
        return self.__dict__["_sae"]

    def __getattr__(self, name: str) -> Any:
        # W_enc, W_dec, b_dec, threshold, W_skip...: the SAE's parameters, read through.
        try:
            return super().__getattr__(name)
        except AttributeError:
            sae = self.__dict__.get("_sae")
            if sae is not None and name in sae._parameters:
                return sae._parameters[name]
            raise

    @property
    def dtype(self) -> torch.dtype:
        return self.sae.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.sae.W_dec.device

    def n_params(self) -> int:
        return sum(p.numel() for p in self.sae.parameters())

    def _apply(self, fn: Any, recurse: bool = True) -> "SAELensModule":
        # .to() / .half() / .cuda(): move the SAE too, and keep SAE-Lens's own record of its
        # dtype and device (process_sae_in casts inputs to sae.dtype) in step.
        super()._apply(fn, recurse)
        sae = self.sae
        sae._apply(fn, recurse)
        param = sae.W_dec
        sae.dtype, sae.device = param.dtype, param.device
        sae.cfg.dtype, sae.cfg.device = dtype_name(param.dtype), str(param.device)
        self.cfg = dataclasses.replace(self.cfg, dtype=dtype_name(param.dtype), device=str(param.device))
        return self

    @contextmanager
    def _sae_hooks(self, pre: nn.Module | None = None) -> Iterator[None]:
        """Bypass the SAE's own hook points for the duration, with `pre` (e.g. this
        module's pre-activation hook) standing in for `hook_sae_acts_pre`."""
        sae = self.sae
        saved = {name: m for name, m in sae._modules.items() if isinstance(m, HookPoint)}
        identity = nn.Identity()
        try:
            for name in saved:
                sae._modules[name] = identity
            if pre is not None and "hook_sae_acts_pre" in saved:
                sae._modules["hook_sae_acts_pre"] = pre
            yield
        finally:
            sae._modules.update(saved)

    # --- the interface -----------------------------------------------------------------
    @property
    def context_doc(self) -> str | None:  # type: ignore[override]
        return "the skip term W_skip x" if self._skip else None

    def context(self, x: Float[Tensor, "... d_in"], h: HookFn) -> Float[Tensor, "... d_out"] | None:
        """A skip transcoder's skip term W_skip x (SAE-Lens adds it in forward); else None."""
        if not self._skip:
            return None
        return skip_out(x.to(self.sae.W_skip.dtype), self.sae.W_skip)

    def pre_acts(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """The SAE's pre-activations (its `hook_sae_acts_pre`), or its latents where those
        do not determine them (see LATENTS_FROM_PRE)."""
        self.check_input(x)
        if not self._latents_from_pre:
            with self._sae_hooks():
                return self.sae.encode(x)
        grab = _Capture()
        with self._sae_hooks(pre=grab):
            self.sae.encode(x)
        assert grab.value is not None, f"{type(self.sae).__name__}.encode never called hook_sae_acts_pre"
        return grab.value

    def activate(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        """The latents (dense) for these pre-activations: the SAE's own encode with its
        pre-activations replaced by `pre` (identity where the pre-activation hook is the
        latent hook). Uses SAE-Lens's code for TopK selection, decoder-norm rescaling and
        JumpReLU thresholds, so it cannot drift from it."""
        if not self._latents_from_pre:
            return pre
        dummy = pre.new_zeros(*pre.shape[:-1], self.cfg.d_in)
        with self._sae_hooks(pre=_Replace(pre)):
            return self.sae.encode(dummy)

    def encode(self, x: Float[Tensor, "... d_in"], hooked: bool = True) -> Encoding:
        """The SAE's latents for `x` through this module's hooks when `hooked` (dense: the
        activations that left `hook_latent_acts`) and the skip term."""
        self.check_input(x)
        h = through if hooked else bypass
        x = h(self.hook_in, x)
        context = self.context(x, h)
        pre = self.pre_hook if hooked and self._latents_from_pre else None
        with self._sae_hooks(pre=pre):
            acts = self.sae.encode(x)
        return Encoding(None, h(self.acts_hook, acts), context)

    def decode(self, enc: Encoding) -> Float[Tensor, "... d_out"]:
        """The SAE's decode of the activations, plus the skip term (as SAE-Lens's forward).
        Like SAE-Lens's own, it must follow the encode of the same input for an SAE that
        normalises its input at run time (layer_norm, constant_norm_rescale)."""
        acts = enc.dense(self.n_units).to(self.dtype)
        with self._sae_hooks():
            out = self.sae.decode(acts)
        return out if enc.context is None else out + enc.context

    def unit_contribution(
        self, x: Float[Tensor, "tokens d_in"], unit: int, value: Float[Tensor, " tokens"]
    ) -> Float[Tensor, "tokens d_out"]:
        """What latent `unit` at `value` adds to the output at inputs `x`:
        decode(value e_unit) - decode(0), each after the SAE processed `x` (so run-time
        input normalisation scales the direction as in the forward pass)."""
        if not 0 <= unit < self.n_units:
            raise ValueError(f"unit={unit} is out of range [0, {self.n_units})")
        x = x.to(self.dtype)
        off = x.new_zeros(*x.shape[:-1], self.n_units)
        on = off.clone()
        on[..., unit] = value.to(self.dtype)
        outs = []
        with self._sae_hooks():
            for acts in (on, off):
                self.sae.process_sae_in(x)  # sets any run-time normalisation state decode reads
                outs.append(self.sae.decode(acts))
        return outs[0] - outs[1]

    def check_model(self, model: Any, layer: int) -> None:
        """An SAE-Lens transcoder learnt from the named hook `blocks.L.ln2.hook_normalized`;
        in a model loaded with fold_ln=False that hook fires before ln2's weight, so it is
        not the MLP input that attach() feeds the module: refused rather than fed the wrong
        activations. (mxd_lens's own modules read the MLP's input itself and serve any model.)"""
        hook = self.cfg.hook_name or ""
        norm = getattr(model.cfg, "normalization_type", None)
        if MLP_IN_HOOK.match(hook) and norm in ("LN", "RMS"):
            raise ValueError(
                f"layer {layer}: this SAE-Lens {self.cfg.saelens_architecture} was trained on {hook}, which in "
                f"this model (loaded with fold_ln=False, normalization_type={norm!r}) fires before ln2's "
                "weight and is not the MLP's input; load the model with fold_ln=True (as SAE-Lens does)"
            )

    def metrics(self) -> dict[str, float]:
        return {}

    # --- what an adapter does not do -------------------------------------------------
    def reset_parameters(self) -> None:
        raise NotImplementedError("an SAELensModule serves a trained SAE-Lens SAE; it has no initialisation")

    def train_forward(self, x: Float[Tensor, "tokens d_in"]) -> StepOutput:
        raise NotImplementedError(
            f"{self.architecture} cannot be trained by mxd_lens (trainable=False): train SAE-Lens SAEs with "
            "SAE-Lens (mxd_lens.training.sae_lens_runner.train_sae_lens for one on the MLP output)"
        )

    def save(self, path: str | Path, **kwargs: Any) -> Path:
        """Write the SAE as SAE-Lens writes it (`sae.save_model`), atomically; `mxd_lens.load`
        and `SAE.load_from_disk` read it back."""
        if kwargs:
            raise ValueError(
                f"SAELensModule.save takes no {sorted(kwargs)}: the folder is SAE-Lens's own; set "
                "sae.cfg.metadata before saving"
            )
        from mxd_lens.atomic import write_dir

        return write_dir(path, lambda tmp: self.sae.save_model(tmp))

    def extra_repr(self) -> str:
        c = self.cfg
        return f"{c.saelens_architecture}, d_in={c.d_in}, d_sae={c.d_sae}, d_out={c.d_out}, site={c.site_names()}"


# --- conversions ------------------------------------------------------------------------
def as_module(obj: Any) -> Replacement:
    """What `attach`, `evaluate_many` and patching splice in for `obj`: an mxd_lens module
    as it is, the SAE-Lens view of one (`ReplacementSAE`) converted back to it
    (`mxd_lens.saelens.from_saelens`, a copy of its weights), any other SAE-Lens SAE
    wrapped by `SAELensModule` (sharing its weights). Anything else is a ValueError."""
    if isinstance(obj, Replacement):
        return obj
    if isinstance(obj, ReplacementSAE):
        from mxd_lens.saelens import from_saelens

        return from_saelens(obj)
    if isinstance(obj, SAE):
        return SAELensModule(obj)
    raise ValueError(
        f"expected an mxd_lens module (MxD, TopKTranscoder, SkipTranscoder...) or a sae_lens SAE, got "
        f"{type(obj).__module__}.{type(obj).__name__}"
    )


def as_modules(replacements: Mapping[int, Any]) -> dict[int, Replacement]:
    """`as_module` of every {layer: module or SAE} entry; errors name the layer. The same
    object at two layers is refused here, before conversion could hide it."""
    seen: dict[int, int] = {}
    out: dict[int, Replacement] = {}
    for layer, obj in replacements.items():
        if id(obj) in seen:
            raise ValueError(
                f"layer {layer}: the same module object is given for layers {seen[id(obj)]} and {layer}; "
                "use one module per layer"
            )
        seen[id(obj)] = layer
        try:
            out[layer] = as_module(obj)
        except ValueError as err:
            raise ValueError(f"layer {layer}: {err}") from None
    return out


def load_saelens_folder(
    folder: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> SAELensModule:
    """An SAE-Lens folder of an architecture that is not mxd_lens's (what `mxd_lens.load`
    calls for one): `SAE.load_from_disk`, wrapped. `device` defaults to cfg.json's (else
    cpu), `dtype` to the saved one."""
    folder = Path(folder)
    if device is None:
        try:
            raw = json.loads((folder / "cfg.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{folder / 'cfg.json'}: not readable as JSON ({err})") from None
        device = (raw.get("device") or "cpu") if isinstance(raw, dict) else "cpu"
    sae = SAE.load_from_disk(folder, device=str(device), dtype=None if dtype is None else dtype_name(parse_dtype(dtype)))
    return SAELensModule(sae)


def sparse_units(acts: Float[Tensor, "... n_units"], k: int) -> TopK:
    """The `k` largest-magnitude entries of each token's dense activations, as (values,
    indices); warns when some token has more than `k` non-zero units (sparse records of a
    variable-L0 SAE then drop its weakest latents there)."""
    n_active = int((acts != 0).sum(-1).max()) if acts.numel() else 0
    if n_active > k:
        warnings.warn(
            f"a token has {n_active} active units but only the strongest k={k} are kept; pass a larger k "
            "when wrapping the SAE (SAELensModule(sae, k=...))",
            stacklevel=2,
        )
    _, indices = acts.abs().topk(k, dim=-1, sorted=False)
    return TopK(acts.gather(-1, indices), indices)


__all__ = [
    "DEFAULT_L0_BOUND",
    "LATENTS_FROM_PRE",
    "MLP_IN_HOOK",
    "MLP_OUT_HOOK",
    "SAELensModule",
    "SAELensModuleConfig",
    "TOPK_ARCHITECTURES",
    "as_module",
    "as_modules",
    "load_saelens_folder",
    "saelens_site",
    "sparse_units",
]
