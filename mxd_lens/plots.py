"""Moved to `mxd_lens.experiments.plots`; re-exported here so that existing imports keep working."""

from mxd_lens.experiments.plots import *  # noqa: F401,F403
from mxd_lens.experiments.plots import __all__  # noqa: F401
