"""The trainer's synchronisation-free AuxK (`_aux_terms`: masked TopK over all units, no
data-dependent shapes) against the plain reference `aux_k_loss` (gather the dead units,
TopK among them)."""

from __future__ import annotations

import pytest
import torch

from mxd_lens.training.trainer import _aux_terms, aux_k_loss, train_forward
from tests.training.helpers import tiny_modules


@pytest.mark.parametrize("name", ["mxd", "tc", "stc"])
@pytest.mark.parametrize("dead_units", [[1, 4, 9], list(range(0, 30, 2))])  # fewer / more than aux_k
def test_sync_free_aux_equals_the_reference(name, dead_units):
    module = tiny_modules()[name]
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x, y = torch.randn(40, 32), torch.randn(40, 32)
    dead = torch.zeros(module.n_units, dtype=torch.bool)
    dead[dead_units] = True
    select = torch.tensor([0, 3, 4, 8, 15, 16, 23, 39])  # a subset of the batch's tokens

    out = train_forward(module, x)
    reference = aux_k_loss(module, x[select], train_forward(module, x[select]), y[select], dead, aux_k=6)
    reference.backward()
    expected = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)

    err, energy = _aux_terms(module, x, out, y, dead, 6, select)
    fast = err / energy
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-7)
    fast.backward()
    for n, g in expected.items():
        torch.testing.assert_close(module.get_parameter(n).grad, g, rtol=1e-4, atol=1e-7, msg=n)
    # units that are alive get no gradient from it
    grad_rows = module.W_dec.grad.abs().sum(1) > 0
    assert grad_rows.any() and (grad_rows <= dead).all()
