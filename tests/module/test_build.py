"""scripts/build-module while nginx processes load its output.

scripts/bench calls build-module, and pytest runs the bench test beside the module
tests, whose nginx processes dlopen build/system/libngx_http_afr_module.so. `install`
unlinked and rewrote that file on every call, up to date or not, and one CI run's
`nginx -t` found it missing (2026-12-07). An up-to-date build must leave the file alone.
"""

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "build/system/libngx_http_afr_module.so"


def test_an_up_to_date_build_leaves_the_module_file_as_it_is():
    if not MODULE.exists():
        pytest.skip("system build missing: run scripts/build-module system")
    before = MODULE.stat()
    run = subprocess.run([str(REPO / "scripts/build-module"), "system"], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    after = MODULE.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), \
        "build-module rewrote a module file nginx may be loading"
    assert not list(MODULE.parent.glob("*.tmp.*")), "a temporary file was left beside the module"
