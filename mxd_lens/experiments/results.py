"""The run format: a frontier run's results.json and its rows, as dataclasses.

`RESULT_KEYS`, `ROW_KEYS` and `RESULTS_FILE` are derived from the dataclasses below, so
the writer (`mxd_lens.experiments.frontier`) and the readers (`mxd_lens.experiments.publish`,
the tests) share one definition. New keys may be added to a results.json; readers ignore
the ones they do not know. Torch-free.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mxd_lens import registry

RESULTS_FILE = "results.json"
"""The file whose presence marks a finished run (written last, atomically)."""


@dataclass(kw_only=True)
class ResultRow:
    """One trained module's numbers on the held-out text."""

    method: str
    """Method name ('mxd', 'transcoder', 'skip_transcoder'); with `k` it names the module
    folder `<method>_k<K>` (`registry.module_folder_name`)."""
    k: int
    """Active units per token (TopK's K)."""
    n_params: int
    """Parameter count of the module."""
    nmse: float | None
    """Normalised reconstruction error of the MLP output."""
    ce: float | None
    """Next-token cross-entropy (nats) with the module spliced in."""
    delta_ce: float | None
    """`ce` minus the clean model's cross-entropy."""
    delta_ce_stderr: float | None
    """Standard error of `delta_ce` over held-out rows."""
    ce_recovered: float | None
    """Fraction of the zero-ablation cross-entropy gap the module recovers."""
    kl: float | None
    """KL divergence of the spliced model's next-token distribution from the clean one."""
    l0: float | None
    """Mean active units per token."""
    dead_fraction: float | None
    """Share of units that never fired on the held-out text."""
    usage_entropy: float | None
    """Entropy (nats) of the units' usage distribution."""
    expert_cos: float | None
    """Mean pairwise cosine similarity of the MxD's expert decoders (None for others)."""

    @property
    def folder(self) -> str:
        """The module's folder name in the run."""
        return registry.module_folder_name(self.method, self.k)


@dataclass(kw_only=True)
class RunResults:
    """A finished frontier run (results.json)."""

    model: str
    """The language model's name."""
    layer: int
    """The block whose MLP the modules replace."""
    train_tokens: int
    """Training tokens per module (optimiser steps x batch size)."""
    eval_tokens: int
    """Held-out next-token predictions the numbers are measured on."""
    ce_clean: float
    """Cross-entropy of the unmodified model."""
    ce_zero_ablation: float
    """Cross-entropy with the MLP's output set to zero."""
    ce_mean_ablation: float
    """Cross-entropy with the MLP's output set to its mean over the training tokens."""
    seed: int
    """The training seed."""
    config: dict[str, Any]
    """The run's FrontierConfig (plus the sizes it resolved to, under 'resolved')."""
    versions: dict[str, str | None]
    """Installed versions of mxd_lens, torch, TransformerLens and SAE-Lens."""
    rows: list[ResultRow] = field(default_factory=list)
    """One row per trained module."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON payload, keys in `RESULT_KEYS` / `ROW_KEYS` order."""
        return dataclasses.asdict(self)

    def module_folders(self) -> list[str]:
        """The folder names of the rows' modules."""
        return [row.folder for row in self.rows]


RESULT_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunResults))
"""The keys of results.json, in order."""
ROW_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ResultRow))
"""The keys of each of its rows, in order."""


def check_results(results: Any, where: str = RESULTS_FILE) -> dict[str, Any]:
    """`results` (a parsed results.json) with every key of the format checked; extra keys
    are allowed (and kept)."""
    if not isinstance(results, dict):
        raise ValueError(f"{where}: expected a JSON object")  # noqa: TRY004  (bad input file)
    missing = [k for k in RESULT_KEYS if k not in results]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    if not isinstance(results["rows"], list):
        raise ValueError(f"{where}: 'rows' must be a list")  # noqa: TRY004
    for i, row in enumerate(results["rows"]):
        absent = [k for k in ROW_KEYS if not isinstance(row, dict) or k not in row]
        if absent:
            raise ValueError(f"{where}: rows[{i}] is missing keys {absent}")
    return results


def read_results(run_dir: str | Path) -> dict[str, Any]:
    """results.json of a run, checked (`check_results`)."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a finished run (it is written last)")
    try:
        results = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return check_results(results, str(path))


def previous_module_folders(run_dir: str | Path) -> list[str]:
    """The module folders of the finished run in `run_dir` (those of its results.json's
    rows; empty when there is none or it is unreadable): what a successful `--overwrite`
    replaces."""
    try:
        results = read_results(run_dir)
    except (FileNotFoundError, ValueError):
        return []
    listed = set()
    for row in results["rows"]:
        try:
            listed.add((registry.method_of(row["method"]), row["k"]))
        except ValueError:
            continue
    names = []
    for path in sorted(Path(run_dir).iterdir()):
        try:
            key = registry.parse_module_folder_name(path.name)
        except ValueError:
            continue
        if path.is_dir() and key in listed:
            names.append(path.name)
    return names


__all__ = [
    "RESULTS_FILE",
    "RESULT_KEYS",
    "ROW_KEYS",
    "ResultRow",
    "RunResults",
    "check_results",
    "previous_module_folders",
    "read_results",
]
