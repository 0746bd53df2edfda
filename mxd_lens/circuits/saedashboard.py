"""Our modules in SAEDashboard (sae-dashboard 0.8.0, as released): its feature-centric page
for a few units of an MxD, a transcoder or an SAE on the MLP output.

SAEDashboard declares pins that conflict with this project's (transformer-lens < 3,
transformers < 4.57, datasets < 4...), so it is not a dependency: `scripts/setup.sh`
installs it with `--no-deps` beside the few packages it imports that we lack (the
`saedashboard` extra of pyproject.toml). Its published API is used as it is:
`SaeVisRunner(SaeVisConfig(...)).run(encoder, model, tokens)` then
`save_feature_centric_vis`. What it needs of an SAE, and where ours provide it:

- `fold_W_dec_norm()` (it calls it first): output-preserving on our SAE-Lens views;
- `activation_fn` that is SAE-Lens's `TopK` (it then encodes all units and slices;
  otherwise it masks W_enc/b_enc by architecture name and refuses ours);
- `cfg.metadata.hook_name` among the model's hooks (it asserts so): the MLP input,
  `blocks.L.ln2.hook_normalized`, or for an SAE `blocks.L.hook_mlp_out`.

It takes a unit's output direction from `W_dec[n]` (its logit tables are
`W_dec[n] @ W_U`). For a transcoder or SAE latent that is what the unit writes; for an
MxD expert it is not: expert n writes a_n c_n * (D^T z), whose direction depends on the
input through z, so SAEDashboard's logit tables for an MxD are those of c_n alone.
`mxd_lens.experts.write_dashboard` shows what an expert actually writes on its top
contexts; its page gives the cosine between the two.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mxd_lens import atomic
from mxd_lens.architectures.base import Replacement
from mxd_lens.validation import check_positive_int, check_token_matrix

SAE_DASHBOARD_VERSION = "0.8.0"
"""The release of sae-dashboard this module is written and tested against."""


def import_sae_dashboard():
    """The `sae_dashboard` package, or an ImportError saying how to install it."""
    try:
        import sae_dashboard
        from sae_dashboard import data_writing_fns, sae_vis_data, sae_vis_runner  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"SAEDashboard is not installed ({err}). It pins old versions of transformer-lens and transformers, "
            f"so it is installed without its dependencies: run scripts/setup.sh, or `pip install -e .[saedashboard]` "
            f"then `pip install --no-deps sae-dashboard=={SAE_DASHBOARD_VERSION}`"
        ) from err
    return sae_dashboard


def saedashboard_page(
    model: HookedTransformer,
    module: Replacement,
    tokens: Int[Tensor, "rows ctx"],
    features: Sequence[int],
    path: str | Path,
    minibatch_size_tokens: int = 8,
):
    """Run SAEDashboard's `SaeVisRunner` on `features` of `module` (not attached: its
    SAE-Lens view is spliced by SAEDashboard itself through a HookedSAETransformer that
    shares `model`'s weights) over `tokens`, and write its feature-centric HTML page to
    `path`, atomically. Returns SAEDashboard's `SaeVisData`."""
    from mxd_lens.saelens import check_splice, hooked_sae_transformer, to_saelens

    check_token_matrix(tokens, model.cfg.d_vocab)
    minibatch_size_tokens = check_positive_int("minibatch_size_tokens", minibatch_size_tokens)
    feats = [int(f) for f in features]
    if not feats or any(not 0 <= f < module.n_units for f in feats) or len(set(feats)) != len(feats):
        raise ValueError(f"features={list(features)!r}: expected distinct unit indices in [0, {module.n_units})")
    import_sae_dashboard()
    from sae_dashboard.data_writing_fns import save_feature_centric_vis
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner

    sae = to_saelens(module).to(model.cfg.device)
    check_splice(model, sae)  # the hook names SAEDashboard asserts, with our clearer message
    if module.context_doc is not None:
        warnings.warn(
            f"SAEDashboard takes a unit's output direction from W_dec[n]; a {module.architecture} unit writes "
            f"a_n W_dec[n] * ({module.context_doc}), an input-dependent direction, so SAEDashboard's logit tables "
            "for this module are not what its units write: see mxd_lens.experts.write_dashboard",
            stacklevel=2,
        )
    cfg = SaeVisConfig(
        hook_point=sae.cfg.metadata.hook_name,
        features=feats,
        minibatch_size_features=len(feats),
        minibatch_size_tokens=minibatch_size_tokens,
        device=str(model.cfg.device),
        dtype="float32",
        verbose=False,
    )
    data = SaeVisRunner(cfg).run(encoder=sae, model=hooked_sae_transformer(model), tokens=tokens)

    def write(tmp: Path) -> None:  # SAEDashboard insists on a .html name; ours is a temp name
        page = tmp.with_name(tmp.name + ".html")
        try:
            save_feature_centric_vis(sae_vis_data=data, filename=page)
            os.replace(page, tmp)
        finally:
            page.unlink(missing_ok=True)

    atomic.write_file(path, write)
    return data


__all__ = ["SAE_DASHBOARD_VERSION", "import_sae_dashboard", "saedashboard_page"]
