"""Check deploy/nginx.conf with `nginx -t` (Debian's nginx), outside Docker.

The upstream host names (ml-gpu0, ...) resolve only on the compose network, and nginx resolves them
when it loads the file, so the check runs on a copy whose upstream servers and listen address point
at the loopback: every other line is the deployed file's. The tests start nginx on the same kind of
copy (`localize`) in front of real replicas.

    python deploy/check_nginx.py            # exit 0 when `nginx -t` accepts the file
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONF = HERE / "nginx.conf"
_SERVER = re.compile(r"^(\s*server\s+)[A-Za-z0-9_.-]+:\d+(\s)", re.MULTILINE)
_LISTEN = re.compile(r"^(\s*listen\s+)\S+;", re.MULTILINE)
_HTTP = re.compile(r"^http\s*\{\n", re.MULTILINE)


def nginx_binary() -> str | None:
    """Return the nginx executable (Debian installs it in /usr/sbin, often off a user's PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None


def localize(conf: str, upstreams: list[str], listen: str, prefix: Path) -> str:
    """Return the config with its upstream servers replaced by `upstreams` (host:port), in order.

    Also listens on `listen` (e.g. 127.0.0.1:8080) and keeps nginx's temporary files under `prefix`,
    so it runs as any user next to other nginx instances; the proxying rules are unchanged.
    """
    servers = _SERVER.findall(conf)
    if len(servers) != len(upstreams):
        raise ValueError(f"nginx.conf has {len(servers)} upstream servers; {len(upstreams)} addresses given")
    addresses = iter(upstreams)
    conf = _SERVER.sub(lambda m: f"{m.group(1)}{next(addresses)}{m.group(2)}", conf)
    conf = _LISTEN.sub(lambda m: f"{m.group(1)}{listen};", conf)
    temp = "".join(
        f"    {name}_temp_path {prefix / name};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return _HTTP.sub(lambda m: m.group(0) + temp, conf, count=1)


def nginx_args(conf_path: Path, prefix: Path, foreground: bool = False) -> list[str]:
    """Return the arguments that run nginx on a localized config, with its pid and error log in `prefix`."""
    main = f"pid {prefix / 'nginx.pid'};" + (" daemon off;" if foreground else "")
    return ["-p", str(prefix), "-c", str(conf_path), "-e", str(prefix / "error.log"), "-g", main]


def check(conf_path: Path = CONF) -> int:
    """Run `nginx -t` on a localized copy of the deployed config; return its exit code."""
    nginx = nginx_binary()
    if nginx is None:
        sys.stderr.write("nginx is not installed (Debian: apt-get install nginx)\n")
        return 1
    with tempfile.TemporaryDirectory(prefix="nginx-check-") as tmp:
        prefix = Path(tmp)
        n = len(_SERVER.findall(conf_path.read_text()))
        upstreams = [f"127.0.0.1:{19090 + i}" for i in range(n)]
        local = prefix / "nginx.conf"
        local.write_text(localize(conf_path.read_text(), upstreams, "127.0.0.1:19089", prefix))
        done = subprocess.run([nginx, "-t", *nginx_args(local, prefix)], capture_output=True, text=True)
        sys.stderr.write(done.stderr.replace(str(local), str(conf_path)))
        return done.returncode


if __name__ == "__main__":
    sys.exit(check(Path(sys.argv[1]) if len(sys.argv) > 1 else CONF))
