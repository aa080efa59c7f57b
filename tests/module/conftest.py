"""Fixtures for ngx_http_afr_module tests against real nginx (helpers in afr_nginx.py).

Every test runs against both builds, system (Debian's nginx) and vendored
(nginx 1.28 from nginx-src); a flavour is skipped only when its build artifact
is missing (scripts/build-module system|vendored).
"""

import threading
from http.server import ThreadingHTTPServer

import pytest

from afr_nginx import FLAVOURS, EchoHandler, Gateway


class Upstream(ThreadingHTTPServer):
    # socketserver listens with a backlog of 5: a burst of connections from nginx
    # (every suspended request resumed at once) would wait for SYN retransmits.
    request_queue_size = 1024


@pytest.fixture(scope="session")
def upstream():
    server = Upstream(("127.0.0.1", 0), EchoHandler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(params=sorted(FLAVOURS))
def flavour(request):
    nginx, module = FLAVOURS[request.param]
    if not nginx.exists() or not module.exists():
        pytest.skip(f"{request.param} build missing: run scripts/build-module {request.param}")
    return request.param, nginx, module


@pytest.fixture
def gateway(flavour, tmp_path, upstream):
    """Factory: gateway(keys, **options) starts a private nginx."""
    started = []
    tmp_path.chmod(0o755)

    def make(keys, **kw):
        prefix = tmp_path / f"gw{len(started)}"
        prefix.mkdir()
        gw = Gateway(flavour, prefix, upstream, keys, **kw)
        started.append(gw)
        return gw.start()

    yield make
    for gw in started:
        gw.stop()
    for gw in started:
        gw.assert_no_crash()
