"""Checkpoints: exact resumption, and interrupted writes that never break the latest checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

import mxd_lens.training.checkpoint as ckpt_mod
import mxd_lens.training.trainer as trainer_mod
from mxd_lens.training import ActivationConfig, TrainerConfig, fit
from mxd_lens.training.checkpoint import latest_checkpoint, load_checkpoint
from tests.training.helpers import tiny_model, tiny_modules, tiny_tokens


def _config(tmp_path, **kw):
    return TrainerConfig(
        train_tokens=14 * 64, batch_size=64, lr=3e-3, warmup_steps=3, schedule="cosine", autocast=None,
        dead_tokens=128, checkpoint_every=4, checkpoint_dir=str(tmp_path), log_every=2, progress=False,
        activations=ActivationConfig(buffer_tokens=128), **kw,
    )


def _run(tmp_path, **kw):
    modules = {n: (1 if n != "stc" else 0, m) for n, m in tiny_modules(seed=11).items()}
    fit(tiny_model(), modules, tiny_tokens(12), _config(tmp_path, **kw))
    return {n: m for n, (_, m) in modules.items()}


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch):
    reference = _run(tmp_path / "a")

    real_step, calls = trainer_mod._train_step, {"n": 0}

    def crash_after_seven_steps(run, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 7 * 3:  # three modules per step
            raise KeyboardInterrupt
        return real_step(run, *args, **kwargs)

    monkeypatch.setattr(trainer_mod, "_train_step", crash_after_seven_steps)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b")
    monkeypatch.setattr(trainer_mod, "_train_step", real_step)
    assert latest_checkpoint(tmp_path / "b").name == "step_00000004"

    resumed = _run(tmp_path / "b", resume=True)
    for name, module in reference.items():
        for (key, p), q in zip(module.state_dict().items(), resumed[name].state_dict().values()):
            torch.testing.assert_close(q, p, rtol=0, atol=0, msg=f"{name}.{key}")
    # the final checkpoints hold the same optimiser state too
    a = load_checkpoint(latest_checkpoint(tmp_path / "a"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert a.state["step"] == b.state["step"] == 14 and a.state["position"] == b.state["position"]
    for name in reference:
        for key, t in a.extra[name].optimizer["state"][0].items():
            assert torch.equal(t, b.extra[name].optimizer["state"][0][key]), (name, key)


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    fresh, tmp_path = tmp_path / "fresh", tmp_path / "run"
    _run(tmp_path)  # checkpoints at steps 4, 8, 12, 14; keeps two
    assert latest_checkpoint(tmp_path).name == "step_00000014"
    before = sorted(p.name for p in tmp_path.iterdir())

    real_save = ckpt_mod.save_file
    calls = {"n": 0}

    def fail_midway(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # after the first module's tensors are on disk
            raise OSError("disk full")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_file", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        _run(fresh)  # a fresh run: its first checkpoint write fails
    assert latest_checkpoint(fresh) is None
    assert [p.name for p in fresh.iterdir()] == []

    done = load_checkpoint(latest_checkpoint(tmp_path))
    state = {k: v for k, v in done.state.items() if k not in ("format", "step", "optimizer_groups")}
    for step in (14, 16):  # over the existing latest folder, and as a new one
        calls["n"] = 0
        with pytest.raises(OSError, match="disk full"):
            ckpt_mod.save_checkpoint(tmp_path, step, state, done.modules, done.extra)
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    latest = load_checkpoint(latest_checkpoint(tmp_path))
    assert latest.state["step"] == 14 and set(latest.modules) == {"mxd", "tc", "stc"}


def test_trainer_json_is_strict_json_and_nan_comes_back(tmp_path):
    """trainer.json never holds NaN (null instead, which a strict reader accepts); a
    resumed run reads the null back as NaN."""
    import json

    from mxd_lens.training.checkpoint import TRAINER_FILE, nan_from_null, save_checkpoint

    modules = {"tc": tiny_modules()["tc"]}
    extra = {"tc": ckpt_mod.ModuleCheckpoint(optimizer={"state": {}, "param_groups": []}, tensors={})}
    state = {"last": {"tc": {"step": 3, "loss": float("nan"), "nmse": 0.5}}}
    path = save_checkpoint(tmp_path, 3, state, modules, extra)

    def refuse(name):
        raise AssertionError(f"trainer.json holds {name}")

    text = (path / TRAINER_FILE).read_text()
    assert json.loads(text, parse_constant=refuse)["last"]["tc"]["loss"] is None
    back = nan_from_null(load_checkpoint(path).state["last"]["tc"])
    assert math.isnan(back["loss"]) and back["nmse"] == 0.5 and back["step"] == 3
