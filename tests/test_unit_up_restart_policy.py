"""`llamaship up`'s restart backoff and exit descriptions."""

from __future__ import annotations

from llamaship.supervisor import RestartPolicy, describe_exit


def test_backoff_doubles_per_recent_restart_up_to_its_cap():
    p = RestartPolicy(backoff_s=0.5, backoff_max_s=30.0)
    assert [p.delay(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


def test_exits_are_described_for_people():
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(None) == "did not start in time"
