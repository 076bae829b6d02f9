"""Site processes share the host's cores instead of each taking all of them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pfedsam.train import threads


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    "requested,markers,expected",
    [
        (3, ["self", "parent"], 3),  # an explicit train.num_threads wins
        (0, [], None),  # nobody registered: all cores
        (0, ["self"], None),  # alone: all cores
        (0, ["self", "dead"], None),  # a dead process's marker is ignored
        (0, ["self", "parent"], 2),  # two live site processes: half the cores each
    ],
)
def test_site_threads(tmp_path, monkeypatch, requested, markers, expected):
    monkeypatch.setattr(threads, "cores", lambda: 4)
    pids = {"self": os.getpid(), "parent": os.getppid(), "dead": _dead_pid()}
    for name in markers:
        (tmp_path / str(pids[name])).touch()
    assert threads.site_threads(requested, tmp_path) == (4 if expected is None else expected)
    assert not (tmp_path / str(pids["dead"])).exists()


def test_never_below_one_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: 1)
    for pid in (os.getpid(), os.getppid()):
        (tmp_path / str(pid)).touch()
    assert threads.site_threads(0, tmp_path) == 1


def test_register_marks_this_process(tmp_path):
    marker = threads.register_site_process(tmp_path)
    assert marker.name == str(os.getpid()) and marker.exists()
    assert threads.live_site_processes(tmp_path) == 1


def test_a_site_takes_its_share_from_the_next_step_when_another_starts(tmp_path, monkeypatch):
    """Checked once per phase, a site that started just before the next simulator client kept every
    core through its phase (3 threads on 2 cores); the count is re-checked before every step."""
    import torch

    from pfedsam.config import load_config
    from pfedsam.data.synth import write_synthetic_sites
    from pfedsam.train import SiteTrainer

    monkeypatch.setattr(threads, "registry_dir", lambda: tmp_path / "sites")
    monkeypatch.setattr(threads, "cores", lambda: 2)
    write_synthetic_sites(tmp_path / "data", sites=1, per_site=12)
    before = torch.get_num_threads()
    try:
        trainer = SiteTrainer(load_config(overrides=["backbone=tiny", "train.device=cpu", "train.num_threads=0"]),
                              "site-1", site_dir=tmp_path / "data" / "site-1", workdir=tmp_path / "w")
        seen: list[int] = []

        def another_site_starts_after_two_steps() -> bool:
            seen.append(torch.get_num_threads())
            if len(seen) == 2:
                (tmp_path / "sites" / str(os.getppid())).touch()
            return False

        trainer.run_global_phase(4, abort=another_site_starts_after_two_steps)
        assert seen == [2, 2, 1, 1]
    finally:
        torch.set_num_threads(before)
