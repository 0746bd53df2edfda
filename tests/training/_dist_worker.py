"""`mxd-lens train` under torchrun with test-only interventions, chosen by environment
variables (launched by tests/training/test_distributed.py; real torch.distributed, real
model, nothing mocked):

    MXD_TEST_PERTURB_RANK=r        rank r's collected MLP outputs are scaled by 1.5: only
                                   that process's share of the activations changes
    MXD_TEST_ROWS_DIR=DIR          every rank writes the token rows it collected to
                                   DIR/rank<r>.json
    MXD_TEST_EXIT_AT_CHECKPOINT=s  every rank dies abruptly (os._exit, no clean-up) right
                                   after the checkpoint of step s is written: a kill
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import mxd_lens.training.activations as activations
import mxd_lens.training.trainer as trainer
from mxd_lens.cli import main

RANK = int(os.environ["RANK"])


def _patch() -> None:
    perturb = os.environ.get("MXD_TEST_PERTURB_RANK")
    if perturb is not None and int(perturb) == RANK:
        real_collect = activations.ActivationSource.collect

        def collect(self, row_indices):
            return {layer: (x, y * 1.5) for layer, (x, y) in real_collect(self, row_indices).items()}

        activations.ActivationSource.collect = collect

    rows_dir = os.environ.get("MXD_TEST_ROWS_DIR")
    if rows_dir:
        real_shares = activations.ActivationSource.shares

        def shares(self, *args, **kwargs):  # only the training stream calls shares()
            Path(rows_dir, f"rank{RANK}.json").write_text(json.dumps(self.rows.tolist()))
            return real_shares(self, *args, **kwargs)

        activations.ActivationSource.shares = shares

    exit_at = os.environ.get("MXD_TEST_EXIT_AT_CHECKPOINT")
    if exit_at:
        real_checkpoint = trainer._checkpoint

        def checkpoint(cfg, runs, step, *args, **kwargs):
            real_checkpoint(cfg, runs, step, *args, **kwargs)
            if step == int(exit_at):
                os._exit(3)

        trainer._checkpoint = checkpoint


if __name__ == "__main__":
    _patch()
    sys.exit(main(sys.argv[1:]))
