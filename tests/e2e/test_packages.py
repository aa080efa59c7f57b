"""Issue 25: the .deb packages, installed into this machine's nginx (Debian 12's).

scripts/package builds afr, libnginx-mod-http-afr and nginx-module-afr; lintian finds no
error in them. The Debian module package and the sidecar package are installed with dpkg
into the machine's nginx, which then passes `nginx -t`. The sidecar is started as its
systemd unit would start it (its user, runtime and state directories, umask, file limit
and environment files, read from the installed unit, which `systemd-analyze verify`
accepts); an nginx that takes the machine's module and afr snippets serves a chat
completion and a stream through them to afr-mock with the official OpenAI SDK. Then a
rebuilt version is installed over it (keys, config and usage kept), removed with that
nginx still running, and purged: /etc/nginx and `nginx -t` end exactly as they began.

Runs as root only (dpkg). A package already installed here is a state this test will not
touch: it skips.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import resource
import shlex
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from conftest import MOCK, REPO, free_port

PACKAGE = REPO / "scripts/package"
PACKAGES = ("afr", "libnginx-mod-http-afr", "nginx-module-afr")
UNIT = Path("/lib/systemd/system/afr.service")
WATCHED = (Path("/etc/nginx"), Path("/usr/lib/nginx"), Path("/usr/share/nginx"))

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="installs packages with dpkg: root only")


def run(*cmd, check=True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=1200, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def tree_state() -> dict[str, str]:
    """Every path under the watched directories with its type, mode and content or target."""
    state = {}
    for root in WATCHED:
        if not root.exists():
            state[str(root)] = "absent"
            continue
        for p in sorted([root, *root.rglob("*")]):
            st = p.lstat()
            if p.is_symlink():
                state[str(p)] = f"link {os.readlink(p)}"
            elif p.is_dir():
                state[str(p)] = f"dir {oct(st.st_mode)}"
            else:
                state[str(p)] = f"file {oct(st.st_mode)} {hashlib.sha256(p.read_bytes()).hexdigest()}"
    return state


def nginx_t() -> tuple[int, str]:
    r = run("/usr/sbin/nginx", "-t", check=False)
    return r.returncode, r.stderr.replace(str(os.getpid()), "")


def installed(pkg: str) -> str | None:
    r = run("dpkg-query", "-W", "-f=${Status} ${Version}", pkg, check=False)
    return r.stdout.split()[-1] if r.returncode == 0 and r.stdout.startswith("install ok installed") else None


def dpkg_known(pkg: str) -> bool:
    """Installed, or removed with its conffiles left: either way not a clean slate."""
    r = run("dpkg-query", "-W", "-f=${Status}", pkg, check=False)
    return r.returncode == 0 and "not-installed" not in r.stdout


def unit_service(path: Path) -> dict[str, list[str]]:
    """The [Service] section of a unit file: each key with all its values, in order."""
    section, values = None, {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            k, _, v = line.partition("=")
            values.setdefault(k.strip(), []).append(v.strip())
    return values


def environment_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            env[k.strip()] = v.strip().strip('"')
    return env


def start_as_unit(log: Path) -> subprocess.Popen:
    """afr.service's process as systemd would start it, from the installed unit's own lines."""
    svc = unit_service(UNIT)
    user, group = svc["User"][0], svc["Group"][0]
    pw = pwd.getpwnam(user)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    for spec in svc["EnvironmentFile"]:
        optional, f = spec.startswith("-"), Path(spec.lstrip("-"))
        if f.exists():
            assert (f.stat().st_mode & 0o077) == 0, f"{f} is readable by others than root"
            env.update(environment_file(f))
        else:
            assert optional, f"{f} is missing"
    for key, base in (("RuntimeDirectory", Path("/run")), ("StateDirectory", Path("/var/lib"))):
        d = base / svc[key][0]
        d.mkdir(exist_ok=True)
        os.chown(d, pw.pw_uid, pw.pw_gid)
        d.chmod(int(svc.get(f"{key}Mode", ["0755"])[0], 8))
    umask, nofile = int(svc["UMask"][0], 8), int(svc["LimitNOFILE"][0])

    # systemd sets LimitNOFILE as PID 1; here it is raised as far as this sandbox's hard limit
    nofile = min(nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1])

    def in_child():
        os.umask(umask)
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    cmd = ["setpriv", f"--reuid={user}", f"--regid={group}", "--init-groups", "--no-new-privs",
           *shlex.split(svc["ExecStart"][0])]
    return subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            preexec_fn=in_child, start_new_session=True)


def wait_socket(path: Path, proc: subprocess.Popen, log: Path):
    for _ in range(200):
        if path.exists():
            return
        assert proc.poll() is None, f"the sidecar exited:\n{log.read_text()}"
        time.sleep(0.05)
    raise AssertionError(f"no {path}:\n{log.read_text()}")


def stop(proc: subprocess.Popen):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=40)


def gateway_conf(d: Path, port: int) -> str:
    """An nginx that takes what the packages put into the machine's nginx: the enabled
    module and the afr snippets; its own pid, logs, temp paths and loopback port."""
    temp = " ".join(f"{k}_temp_path {d}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""user www-data;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log;
include /etc/nginx/modules-enabled/*.conf;
events {{}}
http {{
    include /etc/nginx/mime.types;
    access_log {d}/access.log;
    {temp}
    include /etc/nginx/conf.d/afr.conf;
    server {{
        listen 127.0.0.1:{port};
        include /etc/afr/nginx/afr-server.conf;
    }}
}}
"""


def chat_and_stream(base: str, key: str):
    from openai import OpenAI

    client = OpenAI(base_url=base, api_key=key, max_retries=0, timeout=20)
    done = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}])
    assert done.choices[0].message.content.startswith("Mock reply to: hello there")
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "stream please"}], stream=True) if c.choices)
    assert text.startswith("Mock reply to: stream please"), text


def usage_requests(key_id: str) -> int:
    with sqlite3.connect("file:/var/lib/afr/usage.db?mode=ro", uri=True) as db:
        return db.execute("SELECT count(*) FROM usage WHERE key_id = ?", (key_id,)).fetchone()[0]


def purge():
    present = [p for p in PACKAGES if dpkg_known(p)]
    if present:
        run("dpkg", "--purge", *present)


@pytest.fixture(scope="module")
def machine():
    known = [p for p in PACKAGES if dpkg_known(p)]
    if known:
        pytest.skip(f"{', '.join(known)} already known to dpkg here: not this test's to change")
    before = tree_state(), nginx_t()
    yield before
    purge()
    for path in (Path("/run/afr"), Path("/var/lib/afr")):
        subprocess.run(["rm", "-rf", str(path)])
    assert (tree_state(), nginx_t()) == before, "the machine's nginx is not as the test found it"


def build(out: Path, revision: int) -> dict[str, Path]:
    run(PACKAGE, "--out", out, "--revision", revision)
    debs = {p.name.split("_")[0]: p for p in out.glob("*.deb")}
    assert set(debs) == set(PACKAGES), sorted(out.iterdir())
    return debs


@pytest.fixture(scope="module")
def v1(tmp_path_factory) -> dict[str, Path]:
    return build(tmp_path_factory.mktemp("v1"), 1)


def test_packages_install_serve_upgrade_remove_and_purge(machine, v1, tmp_path):
    nginx_before = machine[1]
    assert nginx_before[0] == 0, f"this machine's nginx -t fails before the test: {nginx_before[1]}"
    debs = v1

    # Same checkout, same contents: a second build gives the same files.
    again = build(tmp_path / "v1-again", 1)
    for name, deb in debs.items():
        assert run("dpkg-deb", "-c", deb).stdout == run("dpkg-deb", "-c", again[name]).stdout, name
        assert hashlib.sha256(deb.read_bytes()).digest() == hashlib.sha256(again[name].read_bytes()).digest(), name

    # lintian: warnings are listed in the closing note with their reasons; errors fail.
    lint = run("lintian", "--no-tag-display-limit", *debs.values(), check=False)
    errors = [line for line in lint.stdout.splitlines() if line.startswith("E:")]
    assert not errors, "\n".join(errors)

    control = run("dpkg-deb", "-f", debs["libnginx-mod-http-afr"], "Depends").stdout
    abi = [p.strip() for p in run("dpkg-query", "-W", "-f=${Provides}", "nginx").stdout.split(",")
           if p.strip().startswith("nginx-abi-")]
    assert abi and abi[0] in control, (abi, control)
    org = run("dpkg-deb", "-f", debs["nginx-module-afr"], "Version", "Depends").stdout
    afr_version = run("dpkg-deb", "-f", debs["afr"], "Version").stdout.strip()
    assert "nginx (= " in org and f"+{afr_version}" in org, org

    # Install: the module is enabled the Debian way and the machine's nginx -t passes.
    run("dpkg", "-i", debs["libnginx-mod-http-afr"], debs["afr"])
    link = Path("/etc/nginx/modules-enabled/50-mod-http-afr.conf")
    assert link.is_symlink() and "ngx_http_afr_module.so" in link.read_text()
    assert Path("/etc/nginx/conf.d/afr.conf").resolve() == Path("/etc/afr/nginx/afr-http.conf")
    assert nginx_t()[0] == 0, nginx_t()[1]
    assert "afr" in run("id", "-nG", "www-data").stdout.split()
    # the sidecar's config is its user's alone: nginx's workers share only its group
    assert run("stat", "-c", "%U:%G %a", "/etc/afr/sidecar.toml").stdout.split() == ["afr:root", "440"]
    assert run("stat", "-c", "%U:%G %a", "/var/lib/afr").stdout.split() == ["afr:afr", "700"]
    assert run("stat", "-c", "%a", "/etc/afr/provider-keys.env", "/etc/afr/afr.env",
               "/etc/afr/upstream-secret.conf").stdout.split() == ["600"] * 3
    verify = run("systemd-analyze", "verify", UNIT, check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr

    # Configure it as an operator would: a provider (afr-mock), its key, an admin port, a key.
    mock_port_file = tmp_path / "mock.port"
    mock = subprocess.Popen([MOCK, "--listen", "127.0.0.1:0", "--port-file", mock_port_file],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sidecar = nginx = None
    d = tmp_path / "nginx"
    d.mkdir()
    os.chmod(tmp_path, 0o755)
    try:
        for _ in range(100):
            if mock_port_file.exists() and mock_port_file.read_text():
                break
            time.sleep(0.05)
        cfg = Path("/etc/afr/sidecar.toml")
        text = cfg.read_text()
        text = text.replace('base_url = "https://api.openai.com/v1"',
                            f'base_url = "http://127.0.0.1:{mock_port_file.read_text()}/v1"')
        text = text.replace('listen = "127.0.0.1:9464"', f'listen = "127.0.0.1:{free_port()}"')
        cfg.write_text(text)
        with open("/etc/afr/provider-keys.env", "a") as f:
            f.write("OPENAI_API_KEY=sk-mock\n")
        out = run("/usr/bin/afr", "key", "new", "--id", "pkg-test", "--name", "package test",
                  "--file", "/etc/afr/keys.toml")
        key = next(w for w in (out.stdout + out.stderr).split() if w.startswith("afr_"))

        log = tmp_path / "sidecar.log"
        sidecar = start_as_unit(log)
        wait_socket(Path("/run/afr/sidecar.sock"), sidecar, log)
        port = free_port()
        (d / "nginx.conf").write_text(gateway_conf(d, port))
        run("/usr/sbin/nginx", "-c", d / "nginx.conf")
        nginx = int((d / "nginx.pid").read_text())
        base = f"http://127.0.0.1:{port}/v1"
        chat_and_stream(base, key)
        stop(sidecar)
        assert usage_requests("pkg-test") == 2

        # Upgrade to a rebuilt version: keys, config, secret and usage stay.
        secret = Path("/etc/afr/afr.env").read_text()
        v2 = build(tmp_path / "v2", 2)
        run("dpkg", "-i", v2["libnginx-mod-http-afr"], v2["afr"])
        upstream = run("dpkg-deb", "-f", debs["afr"], "Version").stdout.strip().rsplit("-", 1)[0]
        assert installed("afr") == installed("libnginx-mod-http-afr") == f"{upstream}-2"
        assert cfg.read_text() == text and "pkg-test" in Path("/etc/afr/keys.toml").read_text()
        assert Path("/etc/afr/afr.env").read_text() == secret
        sidecar = start_as_unit(log)
        wait_socket(Path("/run/afr/sidecar.sock"), sidecar, log)
        run("/usr/sbin/nginx", "-c", d / "nginx.conf", "-s", "reload")  # the upgraded .so
        time.sleep(1)
        chat_and_stream(base, key)
        stop(sidecar)
        assert usage_requests("pkg-test") == 4

        # Remove the sidecar while a site still includes its server snippet: the http snippet
        # that snippet needs stays enabled, so nginx -t keeps passing.
        http_link = Path("/etc/nginx/conf.d/afr.conf")
        site = Path("/etc/nginx/sites-enabled/afr-package-test")
        site.write_text(f"server {{ listen 127.0.0.1:{free_port()}; include /etc/afr/nginx/afr-server.conf; }}\n")
        try:
            assert nginx_t()[0] == 0, nginx_t()[1]
            r = run("dpkg", "-r", "afr")
            assert "stays enabled" in r.stderr, r.stderr
            assert http_link.is_symlink() and nginx_t()[0] == 0, nginx_t()[1]
        finally:
            site.unlink()
        # Then the module: it, and the snippet needing it, are disabled before its file goes;
        # the running nginx lives on.
        run("dpkg", "-r", "libnginx-mod-http-afr")
        assert not os.path.lexists(link) and os.path.islink(f"{link}.removed")
        assert not os.path.lexists(http_link) and os.path.islink(f"{http_link}.removed")
        assert not os.path.lexists("/usr/lib/nginx/modules/ngx_http_afr_module.so")
        assert nginx_t()[0] == 0, nginx_t()[1]
        # still running, and the module it loaded still answers: a request without a key
        r = run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{base}/models")
        assert r.stdout == "401", r.stdout
        assert Path("/etc/afr/keys.toml").exists() and Path("/var/lib/afr/usage.db").exists()

        # Purge: config and data go.
        run("dpkg", "--purge", "afr", "libnginx-mod-http-afr")
        for gone in ("/etc/afr", "/var/lib/afr", link, f"{link}.removed", http_link, f"{http_link}.removed"):
            assert not os.path.lexists(gone), gone
    finally:
        purge()  # on a failure above: the next test starts from a clean slate
        if sidecar:
            stop(sidecar)
        if nginx:  # by PID: `nginx -s stop` parses a config whose includes may be gone
            os.kill(nginx, signal.SIGTERM)
            for _ in range(100):
                if not Path(f"/proc/{nginx}").exists():
                    break
                time.sleep(0.05)
        mock.kill()


def test_the_sidecar_package_never_enables_its_snippet_where_nginx_t_would_fail(machine, v1):
    """Without the module, /etc/nginx/conf.d/afr.conf would make nginx -t fail
    (unknown directive afr_keys): postinst leaves it disabled and says why."""
    r = run("dpkg", "-i", "--force-depends", v1["afr"])
    try:
        assert not Path("/etc/nginx/conf.d/afr.conf").exists()
        assert "fails with /etc/nginx/conf.d/afr.conf, so it was not enabled" in r.stderr, r.stderr
        assert nginx_t()[0] == 0
    finally:
        purge()


def test_the_nginx_org_module_loads_into_nginx_built_with_nginx_orgs_arguments(tmp_path):
    """nginx.org's variant: built against nginx.org's stable sources configured with its
    packages' arguments; that nginx, built from the same tree, loads the packaged module."""
    out = tmp_path / "org"
    run(PACKAGE, "--only", "nginx-org", "--out", out)
    (deb,) = out.glob("nginx-module-afr_*.deb")
    version = run("dpkg-deb", "-f", deb, "Version").stdout.strip()
    nginx_version = version.split("+")[0]
    nginx = REPO / f"build/nginx-org-{nginx_version}/objs/nginx"
    configure = run(nginx, "-V").stderr
    for arg in ("--with-compat", "--prefix=/etc/nginx", "--with-http_v3_module", "--user=nginx"):
        assert arg in configure, configure
    root = tmp_path / "root"
    run("dpkg-deb", "-x", deb, root)
    so = root / "usr/lib/nginx/modules/ngx_http_afr_module.so"
    (tmp_path / "logs").mkdir()
    (tmp_path / "nginx.conf").write_text(
        f"load_module {so};\nuser {pwd.getpwuid(os.geteuid()).pw_name};  # nginx.org's user need not exist\n"
        f"pid {tmp_path}/nginx.pid;\nevents {{}}\nhttp {{ afr_zone t:1m; }}\n")
    run(nginx, "-p", tmp_path, "-c", tmp_path / "nginx.conf", "-e", tmp_path / "logs/error.log", "-t")
    # and Debian's nginx refuses it: a module is for exactly one nginx
    r = run("/usr/sbin/nginx", "-p", tmp_path, "-c", tmp_path / "nginx.conf", "-e", tmp_path / "logs/e2.log",
            "-t", check=False)
    assert r.returncode != 0
    major, minor, patch = (int(x) for x in nginx_version.split("."))
    assert f"version {major * 1_000_000 + minor * 1000 + patch} instead of" in (tmp_path / "logs/e2.log").read_text()
    info = json.dumps(run("dpkg-deb", "-f", deb, "Depends").stdout)
    assert f"nginx-r{nginx_version}" in info, info
