"""Moved to `mxd_lens.experiments.frontier`; re-exported here so that existing imports keep working."""

from mxd_lens.experiments.frontier import *  # noqa: F401,F403
from mxd_lens.experiments.frontier import __all__  # noqa: F401
