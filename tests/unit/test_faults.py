"""BEIT_SCALE_FAULT is read once when a run starts: a malformed value fails before training, a set one is
announced loudly, and an unset one leaves production code calling hooks that do nothing."""
import logging
import math
import signal

import pytest
import torch

from beit_scale import faults
from beit_scale.cli import main


@pytest.mark.parametrize("spec, fault", [
    ("after_step@3", faults.Fault("after_step", 3, 0, False)),
    ("mid_file@12:1", faults.Fault("mid_file", 12, 1, False)),
    ("nan_loss@4+", faults.Fault("nan_loss", 4, 0, True)),
    ("nan_loss@4+:1", faults.Fault("nan_loss", 4, 1, True)),
    ("signal@2:1", faults.Fault("signal", 2, 1, False)),
])
def test_a_fault_is_parsed_into_its_point_step_and_rank(spec, fault):
    assert faults.parse(spec) == fault


@pytest.mark.parametrize("spec", ["after_step", "after-step@3", "after_step@x", "after_step@3:", "kill@3",
                                  "after_step@3+", "nan_loss@-1", "nan_loss@3:1:2", " after_step@3"])
def test_a_malformed_fault_is_a_message_naming_the_variable_and_the_points(spec):
    with pytest.raises(ValueError, match=r"BEIT_SCALE_FAULT=.* is not a fault: use <point>@<step>\[:<rank>\] with a "
                                         r"point of after_step, before_files"):
        faults.parse(spec)


def test_unset_gives_hooks_that_do_nothing_and_the_variable_is_not_read_again(monkeypatch, caplog):
    monkeypatch.delenv("BEIT_SCALE_FAULT", raising=False)
    hooks = faults.from_env()
    assert type(hooks) is faults.NoFaults and not caplog.records
    monkeypatch.setenv("BEIT_SCALE_FAULT", "nan_loss@1+")  # set after start-up: no effect on this run
    loss = torch.tensor(2.0)
    assert hooks.poison(loss, 1, 0) is loss
    hooks.kill("after_step", 1, 0)
    hooks.after_step(1, 0, None, torch.nn.Linear(2, 2))


def test_a_set_fault_is_announced_and_read_once(monkeypatch, caplog):
    monkeypatch.setenv("BEIT_SCALE_FAULT", "nan_loss@2")
    with caplog.at_level(logging.WARNING):
        hooks = faults.from_env()
    assert "BEIT_SCALE_FAULT=nan_loss@2 is set: this run will fail on purpose" in caplog.text
    monkeypatch.delenv("BEIT_SCALE_FAULT")
    loss = torch.tensor(1.0)
    assert hooks.poison(loss, 1, 0) is loss and hooks.poison(loss, 2, 1) is loss  # other step, other rank
    assert math.isnan(hooks.poison(loss, 2, 0)) and hooks.poison(loss, 2, 0) is loss  # once: the retry is clean


def test_nan_weights_poisons_one_weight_of_its_rank_after_its_step():
    layer = torch.nn.Linear(3, 2)
    hooks = faults.parse("nan_weights@2:1")
    hooks.after_step(2, 0, None, layer)
    hooks.after_step(1, 1, None, layer)
    assert torch.isfinite(layer.weight).all()
    hooks.after_step(2, 1, None, layer)
    assert torch.isnan(layer.weight).sum() == 1


def test_a_malformed_fault_stops_the_cli_before_any_process_group(monkeypatch, tmp_path, capfd):
    (tmp_path / "data" / "a").mkdir(parents=True)
    monkeypatch.setenv("BEIT_SCALE_FAULT", "after_step@two")
    handler = signal.getsignal(signal.SIGUSR2)
    try:
        code = main(["train-tokenizer", "--config", "quickstart_tokenizer_small", f"run.output_dir={tmp_path / 'run'}",
                     f"data.root={tmp_path / 'data'}"])
    finally:  # the CLI catches the preemption signal from its start; give the other tests their default back
        signal.signal(signal.SIGUSR2, handler)
    assert code == 2 and "BEIT_SCALE_FAULT='after_step@two' is not a fault" in capfd.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing started: no run folder
