"""Data-parallel training under torchrun (gloo, 2 CPU processes, the real default model):
the same modules as one process, work really split between the ranks, exact resume
after a kill, one set of output files.

Tolerance: every tensor of every module must equal the one-process run's to 1e-4 relative
in Frobenius norm (||a - b|| <= 1e-4 ||a||). The two runs add the same numbers in a
different order (each rank sums its tokens, then the ranks are summed), and Adam turns
that rounding into relative differences of ~1e-5 per tensor in these runs; reordering the
tokens of each batch inside ONE process changes the result by as much. Without the
gradient all-reduce the difference is ~1e-2, and perturbing rank 1's activations moves
it far beyond the tolerance (test_rank_1s_work_reaches_the_result).

Module parallelism (`--parallel modules`) is held to the same tolerance against the same
one-process run; it trains each module on the whole batch in one process, so its
difference comes from collection alone (~1e-7 here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_dist_worker.py")
ROWS = 48
ARGS = [
    "train", "--methods", "mxd,transcoder,skip_transcoder", "--ks", "4", "--width", "64", "--d-hidden", "8",
    "--layers", "3", "--context", "32", "--collect-tokens", str(ROWS * 32), "--eval-tokens", "256",
    "--train-tokens", "1280", "--batch-size", "128", "--buffer-tokens", "512", "--warmup-steps", "2",
    "--lr", "1e-3", "--dead-tokens", "256", "--autocast", "none", "--collect-autocast", "none",
    "--checkpoint-every", "4", "--no-progress",
]
"""Ten steps over three chunks of 16 rows (each row's separator token excluded), with
dead units (AuxK active from step 3) and checkpoints at steps 4, 8 and 10."""


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    return {**env, **extra}


def _run(cmd: list[str], check: bool = True, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def _modules(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor of every module folder: {'<folder>/<file>:<key>': tensor}."""
    tensors = {}
    for path in sorted(out.glob("*_k*/*.safetensors")):
        for key, value in load_file(str(path)).items():
            tensors[f"{path.parent.name}/{path.name}:{key}"] = value
    return tensors


def _files(out: Path) -> list[str]:
    """Every file of a run folder outside its checkpoints, hidden ones included."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "checkpoints" not in p.parts)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    out = {name: tmp / name for name in ("one", "two", "perturbed", "resumed")}
    _run([sys.executable, "-m", "mxd_lens", *ARGS, "--out", str(out["one"])])
    _run(_torchrun("-m", "mxd_lens", *ARGS, "--out", str(out["two"])))
    rows = tmp / "rows"
    rows.mkdir()
    _run(_torchrun(str(WORKER), *ARGS, "--out", str(out["perturbed"])),
         MXD_TEST_PERTURB_RANK="1", MXD_TEST_ROWS_DIR=str(rows))
    killed = _run(_torchrun(str(WORKER), *ARGS, "--out", str(out["resumed"])), check=False,
                  MXD_TEST_EXIT_AT_CHECKPOINT="4")
    after_kill = sorted(p.name for p in (out["resumed"] / "checkpoints").iterdir())
    _run(_torchrun("-m", "mxd_lens", *ARGS, "--resume", "--out", str(out["resumed"])))
    return {**out, "rows": rows, "killed": killed, "after_kill": after_kill}


def test_two_processes_give_the_modules_of_one(runs):
    one, two = _modules(runs["one"]), _modules(runs["two"])
    assert len(one) >= 3 * 3 and one.keys() == two.keys()
    for key, a in one.items():
        assert a.shape == two[key].shape, key
        assert _rel(a, two[key]) <= 1e-4, f"{key}: relative difference {_rel(a, two[key]):.3g}"
    # the modules trained: far from what an untrained start would give
    assert _rel(one["mxd_k4/sae_weights.safetensors:W_out"], torch.zeros(1)) > 0
    # only one set of output files: the same files as one process wrote, no worker's leftovers
    assert _files(runs["two"]) == _files(runs["one"])
    assert not [p for p in runs["two"].iterdir() if p.name.startswith(".")]
    info = json.loads((runs["two"] / "training.json").read_text())["distributed"]
    assert info["world_size"] == 2 and sum(info["rows_per_rank"]) == ROWS
    assert len(info["collect_seconds_per_rank"]) == 2 and min(info["collect_seconds_per_rank"]) > 0
    single = json.loads((runs["one"] / "training.json").read_text())
    assert single["distributed"]["world_size"] == 1 and single["distributed"]["rows_per_rank"] == [ROWS]
    memory = single["activation_memory"]
    # one chunk: 16 rows x 32 tokens x (in + out) x 576 x 4 bytes, for the one layer
    assert memory["buffer_bytes_per_layer"] == 16 * 32 * 2 * 576 * 4 == memory["buffer_bytes"]
    assert json.loads((runs["two"] / "training.json").read_text())["activation_memory"]["buffer_bytes"] == 8 * 32 * 2 * 576 * 4


def test_rank_1s_work_reaches_the_result(runs):
    clean, perturbed = _modules(runs["two"]), _modules(runs["perturbed"])
    moved = {key: _rel(clean[key], perturbed[key]) for key in clean if "sae_weights" in key}
    # rank 0 wrote modules that changed when only rank 1's activations changed
    assert min(moved[k] for k in moved if k.endswith(":b_dec")) > 1e-2, moved
    assert sum(v > 1e-3 for v in moved.values()) >= len(moved) // 2, moved
    # the ranks collected disjoint shares of the rows that make up the whole, as training.json says
    shares = [json.loads((runs["rows"] / f"rank{r}.json").read_text()) for r in range(2)]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == list(range(ROWS))
    info = json.loads((runs["perturbed"] / "training.json").read_text())["distributed"]
    assert info["rows_per_rank"] == [len(shares[0]), len(shares[1])]


def test_resume_after_a_kill_gives_the_uninterrupted_result(runs):
    assert runs["killed"].returncode != 0
    assert runs["after_kill"] == ["LATEST", "step_00000004"]
    uninterrupted, resumed = _modules(runs["two"]), _modules(runs["resumed"])
    assert uninterrupted.keys() == resumed.keys()
    for key, a in uninterrupted.items():
        torch.testing.assert_close(resumed[key], a, rtol=1e-6, atol=1e-9, msg=key)
    assert _files(runs["resumed"]) == _files(runs["two"])


def test_resume_refuses_another_number_of_processes(tmp_path):
    from mxd_lens.training import ActivationConfig, TrainerConfig, fit
    from tests.training.helpers import tiny_model, tiny_tokens, tiny_modules

    def config(**kw):
        return TrainerConfig(
            train_tokens=4 * 64, batch_size=64, autocast=None, checkpoint_every=2, checkpoint_dir=str(tmp_path),
            progress=False, activations=ActivationConfig(buffer_tokens=128), **kw,
        )

    fit(tiny_model(), {"tc": (1, tiny_modules()["tc"])}, tiny_tokens(12), config())
    state = tmp_path / "step_00000004" / "trainer.json"
    saved = json.loads(state.read_text())
    assert saved["distributed"] == {"world_size": 1}
    saved["distributed"]["world_size"] = 2  # as a 2-process run writes it
    state.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="written by 2 process.*this run has 1.*--nproc_per_node=2"):
        fit(tiny_model(), {"tc": (1, tiny_modules()["tc"])}, tiny_tokens(12), config(resume=True))


@pytest.fixture(scope="module")
def module_parallel(runs, tmp_path_factory):
    """The same command with --parallel modules: uninterrupted, and killed after the
    checkpoint of step 4 then resumed."""
    tmp = tmp_path_factory.mktemp("modpar")
    out = {name: tmp / name for name in ("modules", "resumed")}
    _run(_torchrun("-m", "mxd_lens", *ARGS, "--parallel", "modules", "--out", str(out["modules"])))
    killed = _run(_torchrun(str(WORKER), *ARGS, "--parallel", "modules", "--out", str(out["resumed"])), check=False,
                  MXD_TEST_EXIT_AT_CHECKPOINT="4")
    _run(_torchrun("-m", "mxd_lens", *ARGS, "--parallel", "modules", "--resume", "--out", str(out["resumed"])))
    return {**out, "killed": killed}


def test_module_parallelism_gives_the_modules_of_one_process(runs, module_parallel):
    one, two = _modules(runs["one"]), _modules(module_parallel["modules"])
    assert len(one) >= 3 * 3 and one.keys() == two.keys()
    for key, a in one.items():
        assert _rel(a, two[key]) <= 1e-4, f"{key}: relative difference {_rel(a, two[key]):.3g}"
    assert _files(module_parallel["modules"]) == _files(runs["one"])
    info = json.loads((module_parallel["modules"] / "training.json").read_text())["distributed"]
    # both ranks trained (module i of the sorted names on rank i % 2) and both collected
    assert info["parallel"] == "modules"
    assert info["owners"] == {"mxd_k4": 0, "skip_transcoder_k4": 1, "transcoder_k4": 0}
    assert sum(info["rows_per_rank"]) == ROWS and min(info["rows_per_rank"]) > 0
    # exact resume after a kill, under the same N and mode
    assert module_parallel["killed"].returncode != 0
    resumed = _modules(module_parallel["resumed"])
    for key, a in two.items():
        torch.testing.assert_close(resumed[key], a, rtol=1e-6, atol=1e-9, msg=key)

