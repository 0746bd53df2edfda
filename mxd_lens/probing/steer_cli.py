"""The `mxd-lens steer` plugin entry: the command lives in `mxd_lens.probing.command`
(beside `mxd-lens probe`); the command line calls each plugin module's `add_subcommand`."""

from mxd_lens.probing.command import add_steer_subcommand as add_subcommand

__all__ = ["add_subcommand"]
