"""Issue 9, defect 2 under real nginx: the wall clock steps (an NTP step, a VM
resume) while nginx runs, and a key's window neither resets nor stalls.

nginx runs under libfaketime (Debian's `faketime`, installed by scripts/setup)
with only the wall clock faked: the offset is read from a file on every call,
so the test steps it while nginx runs, and CLOCK_MONOTONIC, which windows use
(`ngx_current_msec`, as limit_req), keeps running. The wall clock still drives
what is wall-clock by nature: `Date`, `X-RateLimit-Reset`, key expiry.
afr-core's property test `clock_jumps_never_strand_a_key` covers the window
arithmetic for any sequence of jumps; this checks the module feeds it the
monotonic clock.
"""

import os
import shutil
import tempfile
import time
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from afr_nginx import Gateway, Key

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
HOUR = 3600


@pytest.fixture
def stepped_gateway(flavour, upstream):
    """A one-worker gateway whose wall clock is `offset()` seconds off, set
    through the returned `step(seconds)`."""
    if not LIBFAKETIME.exists():
        pytest.skip("libfaketime missing: run scripts/setup")
    root = Path(tempfile.mkdtemp(prefix="afr-clock-"))
    root.chmod(0o755)
    offset = root / "faketime"
    offset.write_text("+0\n")
    offset.chmod(0o644)
    made = []

    def make(keys):
        env = dict(
            os.environ,
            LD_PRELOAD=str(LIBFAKETIME),
            FAKETIME_TIMESTAMP_FILE=str(offset),
            FAKETIME_NO_CACHE="1",
            FAKETIME_DONT_FAKE_MONOTONIC="1",
        )
        # nginx clears its workers' environment: pass libfaketime's settings on.
        keep = "".join(f"env {name};\n" for name in ("LD_PRELOAD", "FAKETIME_TIMESTAMP_FILE", "FAKETIME_NO_CACHE", "FAKETIME_DONT_FAKE_MONOTONIC"))
        gw = Gateway(flavour, root / "gw", upstream, keys, workers=1, extra_main=keep, env=env)
        made.append(gw)
        return gw.start()

    def step(seconds):
        offset.write_text(f"{seconds:+d}\n")

    yield make, step
    for gw in made:
        gw.stop()
        gw.assert_no_crash()
    shutil.rmtree(root, ignore_errors=True)


def date_of(resp):
    return parsedate_to_datetime(resp.header("Date")).timestamp()


def check_honest_429(resp):
    """Retry-After is exactly Reset − Date and at most two windows (a sliding
    window's previous minute still weighs): the key comes back within two
    minutes of the client's clock whatever the step, never an hour."""
    assert resp.status == 429, resp.status
    retry = int(resp.header("Retry-After"))
    reset = int(resp.header("X-RateLimit-Reset"))
    assert 1 <= retry <= 121, resp.headers
    assert retry == reset - int(date_of(resp)), resp.headers


def test_wall_clock_steps_neither_reset_nor_stall_a_window(stepped_gateway):
    make, step = stepped_gateway
    k = Key("stepped", rpm=3)
    # Expires in half an hour of real time: the step forward passes it.
    soon = Key("soon", expires=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + HOUR / 2)))
    gw = make([k, soon])
    # Stay inside one monotonic window for the burst and both steps.
    sec = time.monotonic() % 60
    if sec > 45:
        time.sleep(60 - sec + 0.5)
    assert [gw.request("/", k.auth).status for _ in range(3)] == [200] * 3
    check_honest_429(gw.request("/", k.auth))
    assert gw.request("/", soon.auth).status == 200

    # One hour ahead: a wall-clock window would have ended; this one has not.
    step(+HOUR)
    ahead = gw.request("/", k.auth)
    assert date_of(ahead) > time.time() + HOUR - 60, "libfaketime did not move nginx's clock"
    check_honest_429(ahead)
    assert gw.request("/", soon.auth).status == 403  # expiry is wall-clock by nature

    # One hour behind: a wall-clock window would now start in the future and
    # refuse the key for an hour while saying "retry in 60 s".
    step(-HOUR)
    behind = gw.request("/", k.auth)
    assert date_of(behind) < time.time() - HOUR + 60
    check_honest_429(behind)
    assert gw.request("/", soon.auth).status == 200
    gw.assert_no_crash()
