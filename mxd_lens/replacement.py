"""Moved to `mxd_lens.architectures.base`; re-exported here so that existing imports keep working."""

from mxd_lens.architectures.base import *  # noqa: F401,F403
from mxd_lens.architectures.base import __all__  # noqa: F401
