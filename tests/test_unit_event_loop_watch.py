"""The event-loop watch: lag into a histogram, and the stacks of whatever holds the loop."""

import asyncio
import time

from prometheus_client import REGISTRY

from shared.telemetry import watch_event_loop


def _hold_the_loop_for_a_while() -> None:
    time.sleep(1.2)


def test_a_held_loop_is_measured_and_its_holder_named(capfd, caplog):
    async def main():
        watch = asyncio.ensure_future(watch_event_loop("watch-test", interval_s=0.05, stall_s=0.5))
        await asyncio.sleep(0.2)
        _hold_the_loop_for_a_while()
        await asyncio.sleep(0.2)
        watch.cancel()

    asyncio.run(main())
    err = capfd.readouterr().err
    assert "_hold_the_loop_for_a_while" in err  # faulthandler's dump, taken while the loop was held
    assert "watch-test: the event loop was held for 1." in caplog.text
    slow = REGISTRY.get_sample_value("llamaship_event_loop_lag_seconds_bucket", {"service": "watch-test", "le": "0.5"})
    count = REGISTRY.get_sample_value("llamaship_event_loop_lag_seconds_count", {"service": "watch-test"})
    assert count - slow == 1  # exactly one wake-up was later than 0.5 s
