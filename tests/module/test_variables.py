"""The module's nginx variables ($afr_key_id, $afr_key_name, $afr_rate_limit,
$afr_rate_remaining, $afr_status) in log_format, map and proxy_set_header."""

from afr_nginx import Key, wait_for
from test_limits import away_from_window_boundary

LOG_FORMAT = "log_format afr '$status $afr_status key=$afr_key_id name=\"$afr_key_name\" limit=$afr_rate_limit remaining=$afr_rate_remaining';"


def test_variables_in_log_format_map_and_proxy_set_header(gateway, tmp_path):
    ok = Key("k-ok", rpm=2)
    off = Key("k-off", enabled=False)
    old = Key("k-old", expires="2001-01-01T00:00:00Z")
    extra_http = LOG_FORMAT + "\nmap $afr_status $afr_limited { limited yes; default no; }"
    gw = gateway([ok, off, old], extra_http=extra_http, extra_server="")
    access = gw.prefix / "access.log"
    gw.stop()
    gw.extra_server = (
        f"access_log {access} afr;\n"
        "proxy_set_header X-Key-Name $afr_key_name;\n"
        "add_header X-Limited $afr_limited always;"
    )
    gw.conf.write_text(gw.render())
    gw.start()
    away_from_window_boundary()
    r = gw.request("/", ok.auth)
    assert r.status == 200
    assert ("X-Key-Name", "test key k-ok") in r.upstream_headers()
    assert r.header("X-Limited") == "no"
    assert gw.request("/", ok.auth).status == 200
    r = gw.request("/", ok.auth)
    assert r.status == 429 and r.header("X-Limited") == "yes"
    assert gw.request("/", off.auth).status == 403
    assert gw.request("/", old.auth).status == 403
    assert gw.request("/", {"Authorization": "Bearer afr_" + "x" * 40}).status == 401
    assert gw.request("/static").status == 200
    lines = wait_for(lambda: access.exists() and len(access.read_text().splitlines()) >= 7 and access.read_text().splitlines(), 5)
    # Each worker writes its line after the answer left, so two workers' lines for
    # consecutive requests may come in either order: compared as a set of lines.
    assert sorted(lines) == sorted([
        '200 admitted key=k-ok name="test key k-ok" limit=2 remaining=1',
        '200 admitted key=k-ok name="test key k-ok" limit=2 remaining=0',
        '429 limited key=k-ok name="test key k-ok" limit=2 remaining=0',
        '403 disabled key=k-off name="test key k-off" limit=- remaining=-',
        '403 expired key=k-old name="test key k-old" limit=- remaining=-',
        '401 unknown key=- name="-" limit=- remaining=-',
        '200 - key=- name="-" limit=- remaining=-',
    ])
    # Never the secret.
    assert ok.token not in access.read_text()


def test_afr_trace_id_is_the_clients_trace_or_a_fresh_one_in_header_and_log(gateway):
    """$afr_trace_id: the trace id of one valid traceparent, else a fresh random id; one
    value per request, so the header to the upstream and the log line agree."""
    import re

    ok = Key("k-trace", rpm=100)
    gw = gateway([ok], extra_http="log_format trace '$afr_trace_id';", extra_server="")
    access = gw.prefix / "trace.log"
    gw.stop()
    gw.extra_server = f"access_log {access} trace;\nproxy_set_header X-Trace $afr_trace_id;"
    gw.conf.write_text(gw.render())
    gw.start()
    tid = "4bf92f3577b34da6a3ce929d0e0e4736"
    sent = []
    for extra in (
        {"traceparent": f"00-{tid}-00f067aa0ba902b7-01"},
        {},
        {},
        {"traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01"},
    ):
        r = gw.request("/", {**ok.auth, **extra})
        assert r.status == 200
        (trace,) = [v for k, v in r.upstream_headers() if k == "X-Trace"]
        sent.append(trace)
    assert sent[0] == tid, "the client's trace continues"
    assert all(re.fullmatch(r"[0-9a-f]{32}", t) for t in sent[1:]), sent
    assert len(set(sent[1:])) == 3, "fresh ids differ, and an invalid traceparent gets one too"
    lines = wait_for(lambda: access.exists() and len(access.read_text().split()) >= 4 and access.read_text().split(), 5)
    assert sorted(lines) == sorted(sent), "the log line has the id the upstream got"
