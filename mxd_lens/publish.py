"""Moved to `mxd_lens.experiments.publish`; re-exported here so that existing imports keep working."""

from mxd_lens.experiments.publish import *  # noqa: F401,F403
from mxd_lens.experiments.publish import __all__  # noqa: F401
