"""Hot reload of keys.toml (within 2 s, no stale cache), broken files, `nginx -t`."""

import os
from pathlib import Path
import signal

from afr_nginx import Gateway, Key, keys_toml, wait_for

RELOAD_WITHIN = 2.0


def status_becomes(gw, key, status):
    return wait_for(lambda: gw.request("/", key.auth).status == status, RELOAD_WITHIN)


def test_new_key_works_and_removed_key_stops(gateway):
    old, new = Key("old"), Key("new")
    gw = gateway([old])
    assert gw.request("/", new.auth).status == 401  # now cached as unknown in some worker
    gw.write_keys([new])
    assert status_becomes(gw, new, 200), gw.log()
    assert status_becomes(gw, old, 401), gw.log()
    # every worker switched: a run of requests sees no stale answer
    assert {gw.request("/", old.auth).status for _ in range(20)} == {401}
    assert {gw.request("/", new.auth).status for _ in range(20)} == {200}
    assert "afr: loaded 1 keys" in gw.log()


def test_disabled_key_stops_within_two_seconds(gateway):
    k = Key("flip")
    gw = gateway([k])
    assert gw.request("/", k.auth).status == 200
    k.enabled = False
    gw.write_keys([k])
    assert status_becomes(gw, k, 403), gw.log()


def test_broken_file_keeps_previous_table(gateway):
    k = Key("keeper")
    gw = gateway([k])
    broken = keys_toml([k]) + '\n[[key]]\nid = "bad"\nname = "x"\nhash = "sha256:nothex"\n'
    gw.write_keys(broken)
    assert wait_for(lambda: "keeping the previous keys" in gw.log(), RELOAD_WITHIN + 1), gw.log()
    assert f'keys file "{gw.keys_path}" line 13: key[2].hash:' in gw.log(), gw.log()
    assert {gw.request("/", k.auth).status for _ in range(10)} == {200}
    # a fixed file is picked up again
    other = Key("other")
    gw.write_keys([k, other])
    assert status_becomes(gw, other, 200), gw.log()


def test_nginx_reload_with_broken_keys_file_keeps_running(gateway):
    k = Key("steady")
    gw = gateway([k])
    workers = gw.worker_pids()
    gw.write_keys("[[key]]\nid = 5\n")
    r = gw.run("-s", "reload")  # the signalling process parses the config too
    assert r.returncode != 0 and f'keys file "{gw.keys_path}" line 2: key[1].id:' in r.stderr, r.stderr
    os.kill(gw.proc.pid, signal.SIGHUP)  # the master itself refuses the new config
    assert wait_for(lambda: f'keys file "{gw.keys_path}" line 2' in gw.log(), 3), gw.log()
    assert gw.request("/", k.auth).status == 200
    assert gw.worker_pids() == workers


def test_nginx_t_rejects_broken_keys_file_with_file_line_field(flavour, tmp_path, upstream):
    tmp_path.chmod(0o755)
    k = Key("a")
    cases = {
        "dup-id": (keys_toml([k, Key("a")]), ":11: key[2].id: duplicate id"),
        "bad-rpm": (keys_toml([Key("r", rpm=0)]), ":8: key[1].rpm: must be between"),
        "bad-type": ('[[key]]\nid = "x"\nname = "n"\nhash = "sha256:00"\nenabled = "yes"\n', ":5: key[1].enabled:"),
        "unknown-field": ('[[key]]\nid = "x"\nrpn = 3\n', ":3: key[1].rpn: unknown field"),
        "bad-expires": (keys_toml([Key("e", expires="tomorrow")]), ":9: key[1].expires: must be an RFC 3339"),
    }
    for name, (text, expected) in cases.items():
        gw = Gateway(flavour, tmp_path / name, upstream, text)
        r = gw.run("-t")
        assert r.returncode != 0, name
        line, rest = expected[1:].split(": ", 1)
        # Worded like nginx's own file errors: keys file "…" line N: field: message.
        assert f'keys file "{gw.keys_path}" line {line}: {rest}' in r.stderr, (name, r.stderr)
    ok = Gateway(flavour, tmp_path / "ok", upstream, [k])
    r = ok.run("-t")
    assert r.returncode == 0, r.stderr


def test_nginx_t_rejects_afr_without_zone(flavour, tmp_path, upstream):
    tmp_path.chmod(0o755)
    gw = Gateway(flavour, tmp_path / "nozone", upstream, [Key("a")])
    gw.conf.write_text(gw.render().replace("afr_zone afr:1m;", ""))
    r = gw.run("-t")
    assert r.returncode != 0 and '"afr on" requires both "afr_keys" and "afr_zone"' in r.stderr
    gw.conf.write_text(gw.render().replace("afr_zone afr:1m;", "afr_zone afr;"))
    r = gw.run("-t")
    assert r.returncode != 0 and "expected name:size" in r.stderr


def test_shipped_example_keys_file_is_valid(flavour, tmp_path, upstream):
    tmp_path.chmod(0o755)
    example = (Path(__file__).resolve().parents[2] / "conf/keys.toml").read_text()
    gw = Gateway(flavour, tmp_path / "example", upstream, example)
    r = gw.run("-t")
    assert r.returncode == 0, r.stderr


def test_missing_keys_file_is_logged_and_previous_table_stays(gateway):
    k = Key("survivor")
    gw = gateway([k])
    gw.keys_path.unlink()
    assert wait_for(lambda: "cannot stat keys file" in gw.log(), RELOAD_WITHIN + 2), gw.log()
    assert f"{gw.keys_path}" in gw.log()
    assert {gw.request("/", k.auth).status for _ in range(10)} == {200}
    other = Key("back")
    gw.write_keys([k, other])
    assert status_becomes(gw, other, 200), gw.log()


def test_zone_directive_errors_read_like_nginx(flavour, tmp_path, upstream):
    tmp_path.chmod(0o755)
    gw = Gateway(flavour, tmp_path / "small", upstream, [Key("a")])
    for zone, expected in {
        "afr:16k": '"afr_zone" zone "afr" is too small',
        "afr:lots": 'invalid zone size "lots" in "afr_zone" directive',
    }.items():
        gw.conf.write_text(gw.render().replace("afr_zone afr:1m;", f"afr_zone {zone};"))
        r = gw.run("-t")
        assert r.returncode != 0 and expected in r.stderr and f"in {gw.conf}:" in r.stderr, r.stderr


def test_changed_zone_size_on_reload_says_so_at_notice(gateway):
    k = Key("sized", rpm=3)
    gw = gateway([k], zone="1m")
    assert gw.request("/", k.auth).status == 200
    gw.zone = "2m"
    gw.conf.write_text(gw.render())
    gw.reload()
    assert wait_for(lambda: 'zone "afr" size changed from 1024k to 2048k' in gw.log(), 3), gw.log()
    assert "[notice]" in next(l for l in gw.log().splitlines() if "size changed" in l)
    # Same size again: reused silently, counters kept.
    before = gw.log().count("size changed")
    gw.reload()
    assert gw.log().count("size changed") == before
