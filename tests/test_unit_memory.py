"""The compile's peak RSS counts the compiler and the processes it started."""

import subprocess
import sys
import time

from compiler_service.memory import PeakRss


def test_peak_rss_sees_a_child_that_comes_and_goes():
    with PeakRss(interval_s=0.02) as peak:
        before = peak.bytes
        child = subprocess.Popen([sys.executable, "-c",
                                  "import time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); "
                                  "time.sleep(0.6)"])
        child.wait(30)
        time.sleep(0.05)
    assert peak.bytes - before > 250 << 20, (before, peak.bytes)
