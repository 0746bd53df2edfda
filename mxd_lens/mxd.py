"""Moved to `mxd_lens.architectures.mxd`; re-exported here so that existing imports keep working."""

from mxd_lens.architectures.mxd import *  # noqa: F401,F403
from mxd_lens.architectures.mxd import __all__  # noqa: F401
