"""`TrainerConfig.per_method`: settings that differ by method within one run (the demo's
per-method winners of benchmarks/tune.py)."""

from __future__ import annotations

import pytest
import torch

from mxd_lens.training import ActivationConfig, TrainerConfig, fit
from mxd_lens.training.config import PER_MODULE_FIELDS
from tests.training.helpers import tiny_model, tiny_modules, tiny_tokens


def _cfg(**kw) -> TrainerConfig:
    base = dict(train_tokens=256, batch_size=64, lr=3e-3, warmup_steps=2, autocast=None, dead_tokens=64,
                progress=False, activations=ActivationConfig(buffer_tokens=128, exclude_special_tokens=False))
    base.update(kw)
    return TrainerConfig(**base)


PER_METHOD = {
    "mxd": {"lr": 1e-2, "center_encoder": True, "gate_lr_scale": 0.5},
    "topk_transcoder": {"lr": 1e-3, "aux_coeff": 0.0, "dead_tokens": 128},  # an architecture name as key
}


def _states(modules) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in modules.items()}


def test_one_run_with_per_method_equals_separate_runs():
    """Training the three architectures together under per_method gives each the weights
    (and dead fraction) of training it alone under its own overridden config: the
    overrides reach lr, initialisation, lr groups, AuxK and the dead counter; the skip
    transcoder, which has no entry, trains with the base config."""
    model, tokens = tiny_model(), tiny_tokens(8)
    together = tiny_modules(seed=3)
    summary = fit(model, {n: (1, m) for n, m in together.items()}, tokens, _cfg(per_method=PER_METHOD))
    alone_cfg = {"mxd": _cfg(**PER_METHOD["mxd"]), "tc": _cfg(**PER_METHOD["topk_transcoder"]), "stc": _cfg()}
    for name, cfg in alone_cfg.items():
        alone = tiny_modules(seed=3)[name]
        result = fit(model, {name: (1, alone)}, tokens, cfg)
        for key, value in alone.state_dict().items():
            torch.testing.assert_close(together[name].state_dict()[key], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name}.{key}: {m}")
        assert summary[name].dead_fraction == result[name].dead_fraction
    # and the overrides mattered: the base config trains the MxD to other weights
    plain = tiny_modules(seed=3)["mxd"]
    fit(model, {"mxd": (1, plain)}, tokens, _cfg())
    assert not torch.allclose(plain.W_enc, together["mxd"].W_enc, atol=1e-4)


def test_for_architecture_applies_only_its_entry():
    cfg = _cfg(per_method=PER_METHOD)
    assert cfg.for_architecture("mxd").lr == 1e-2 and cfg.for_architecture("mxd").center_encoder
    assert cfg.for_architecture("transcoder").lr == 1e-3  # method name of topk_transcoder
    assert cfg.for_architecture("skip_transcoder").lr == 3e-3
    assert cfg.for_architecture("mxd").per_method == {}
    assert TrainerConfig.from_dict(cfg.to_dict()).per_method == PER_METHOD  # JSON round trip


@pytest.mark.parametrize(
    "per_method, message",
    [
        ({"moe": {"lr": 1e-3}}, "unknown architecture or method 'moe'"),
        ({"mxd": {"batch_size": 128}}, "sets ['batch_size'], which every module of a run shares"),
        ({"mxd": {"learning_rate": 1e-3}}, "sets ['learning_rate']"),
        ({"mxd": {"lr": -1.0}}, "lr=-1.0 must be a positive number"),
        ({"mxd": {"warm_start_dense": True}}, "expert_init_noise"),
        ({"transcoder": {"lr": 1e-3}, "topk_transcoder": {"lr": 1e-2}}, "twice"),
        ({"mxd": 0.001}, "must be a dict of field -> value"),
    ],
)
def test_bad_per_method_is_refused_naming_it(per_method, message):
    with pytest.raises(ValueError) as err:
        _cfg(per_method=per_method)
    assert message in str(err.value)


def test_per_module_fields_are_trainer_fields():
    names = {f for f in TrainerConfig.__dataclass_fields__}
    assert set(PER_MODULE_FIELDS) <= names
    assert not {"batch_size", "train_tokens", "activations", "seed", "per_method"} & set(PER_MODULE_FIELDS)


def test_cli_per_method_flag(tmp_path, capsys):
    from mxd_lens.cli import build_parser, config_from_args, main
    from mxd_lens.experiments.config import FrontierConfig, demo_config

    argv = ["frontier", "--per-method", '{"mxd": {"lr": 0.002, "warm_start_dense": true, "expert_init_noise": 1.0}}',
            "--out", str(tmp_path / "r")]
    t = config_from_args(build_parser(argv).parse_args(argv), FrontierConfig()).trainer
    assert t.for_architecture("mxd").lr == 0.002 and t.for_architecture("mxd").warm_start_dense
    assert t.for_architecture("transcoder").lr == t.lr
    # the demo's own per-method settings are its default, and valid
    assert demo_config().trainer.for_architecture("mxd").warm_start_dense
    for bad, message in (("{mxd: 1}", "expected JSON"), ('["mxd"]', "a JSON object"),
                         ('{"mxd": {"batch_size": 64}}', "every module of a run shares")):
        assert main(["frontier", "--per-method", bad, "--out", str(tmp_path / "x")]) != 0
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
