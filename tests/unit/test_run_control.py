"""Run control in one process: the preemption flag, the heartbeat watchdog, the heartbeat report."""
import os
import signal
import time

import pytest
import torch

from beit_scale.checkpoint import RunLayout
from beit_scale.checks import validate
from beit_scale.config import load_config
from beit_scale.train.control import Heartbeat, StopSignal, heartbeat_report


def test_the_signal_only_sets_a_flag_read_at_check_steps():
    stop = StopSignal("USR2", check_every=3, device=torch.device("cpu"))
    try:
        assert not stop.agreed(3)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.flag
        assert not stop.agreed(4) and stop.agreed(6)  # only every check_every steps
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL


def test_no_signal_configured_never_stops():
    stop = StopSignal("", check_every=1, device=torch.device("cpu"))
    assert stop.signum is None and not stop.agreed(1)


class Watched(Heartbeat):
    """A watchdog that records its verdict instead of ending the process."""

    def _fail(self, message):
        self.verdict = message
        self._stop.set()


def test_a_silent_neighbour_is_named_with_its_step(tmp_path):
    layout = RunLayout(tmp_path)
    rank1 = Heartbeat(layout.heartbeat, 1, 2, timeout=0, stall_timeout=0)  # no thread: writes only when told
    rank1.beat(7)
    rank1._write(done=False)
    rank0 = Watched(layout.heartbeat, 0, 2, timeout=1.0, stall_timeout=0)
    rank0.beat(7)
    deadline = time.monotonic() + 10
    while not hasattr(rank0, "verdict") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f"rank 1 ({rank1.host}, pid {rank1.pid}) at step 7 gave no sign of life" in rank0.verdict
    assert "This rank (0) is at step 7" in rank0.verdict
    report = heartbeat_report(layout.heartbeats())
    assert f"rank 1: {rank1.host} pid {rank1.pid}, last finished step 7, last seen" in report


def test_a_neighbour_that_finished_or_keeps_beating_is_left_alone(tmp_path):
    layout = RunLayout(tmp_path)
    rank1 = Heartbeat(layout.heartbeat, 1, 2, timeout=0.8, stall_timeout=0)
    rank0 = Watched(layout.heartbeat, 0, 2, timeout=0.8, stall_timeout=0)
    time.sleep(2.0)  # rank 1's thread keeps its file fresh
    rank1.close()  # done: no longer watched
    time.sleep(2.0)
    rank0.close()
    assert not hasattr(rank0, "verdict")
    assert "done" in heartbeat_report(layout.heartbeats())


def test_a_rank_without_steps_for_the_stall_timeout_names_itself(tmp_path):
    rank0 = Watched(RunLayout(tmp_path).heartbeat, 0, 1, timeout=0, stall_timeout=1.0)
    rank0.beat(3)
    deadline = time.monotonic() + 10
    while not hasattr(rank0, "verdict") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "rank 0 (" in rank0.verdict and "finished no step for" in rank0.verdict
    assert "last finished step 3" in rank0.verdict


@pytest.mark.parametrize("value, message", [
    ("KILL", "is not a signal a scheduler sends before preempting a job"),
    ("NOPE", "is not a signal a scheduler sends before preempting a job"),
    ("CHLD", "is not a signal a scheduler sends"),  # a data-loader worker's exit would look like preemption
])
def test_uncatchable_or_unknown_preempt_signals_are_refused(value, message):
    cfg = load_config("quickstart_pretrain", [f"train.preempt_signal={value}", "train.micro_batch=8",
                                              "train.global_batch=8", "train.grad_accum=1"])
    with pytest.raises(ValueError, match=message):
        validate(cfg, 1)


def test_a_signal_during_start_up_is_kept_for_the_loop(monkeypatch):
    from beit_scale.train import control

    monkeypatch.setattr(control, "_early_signal", False)
    previous = signal.getsignal(signal.SIGUSR2)
    try:
        control.catch_early("USR2")
        os.kill(os.getpid(), signal.SIGUSR2)  # default action would end the process
        stop = StopSignal("USR2", check_every=1, device=torch.device("cpu"))
        assert stop.flag and stop.agreed(1)
        stop.close()
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_heartbeat_of_a_folder_that_is_not_there_is_a_message(tmp_path, capsys):
    from beit_scale.cli import main

    assert main(["heartbeat", str(tmp_path / "typo")]) == 2
    assert "typo is not a run folder" in capsys.readouterr().err


def test_run_dir_takes_a_jobs_command_line_as_the_slurm_script_passes_it(capsys):
    from beit_scale.cli import main

    assert main(["run-dir", "--config", "quickstart_pretrain", "run.output_dir=/x/y", "--allow-config-change",
                 "train.total_steps"]) == 0
    assert capsys.readouterr().out.strip() == "/x/y"
