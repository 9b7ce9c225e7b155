"""nginx in front of the SuperLink: hospitals reach the Fleet API and nothing else.

In Flower 1.41 one `flower-superlink` process serves the Fleet API (`/v1/fleet/*`, what
SuperNodes call), the Control API (`/v1/control/*`: start and stop runs, register and
unregister SuperNodes; no authentication in the open-source build) and the Runtime API
(`/v1/runtime/*`, what the ServerApp process calls) over HTTPS on a single `--host`/
`--port` (flwr/superlink/cli/flower_superlink.py: one uvicorn app; `--fleet-api-address`
and `--control-api-address` are deprecated and no longer bind anything). Flower's flags
cannot split them, so the SuperLink binds loopback only and nginx, a standard and
well-kept reverse proxy, listens on the hospitals' address, terminates TLS with the same
server certificate, forwards POST /v1/fleet/* to the SuperLink over TLS (verified against
the consortium CA) and answers 404 to every other path. SuperNode authentication is a
signature in request headers (flwr/superlink/routers/fleet/node_auth.py), so it passes
through the proxy untouched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from common.errors import ConfigError
from fedhosp.certs import ServerCerts

CONFIG = "nginx.conf"
FLEET_PREFIX = "/v1/fleet/"
NGINX_HINT = "install nginx (Debian/Ubuntu: apt-get install nginx-light) or pass --nginx PATH"


def find_nginx(explicit: str | None = None) -> str:
    found = shutil.which(explicit or "nginx") or (shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
                                                  if not explicit else None)
    if not found:
        raise ConfigError(f"nginx not found: it keeps the Control API off the hospitals' address; {NGINX_HINT}")
    return found


def render(listen_host: str, listen_port: int, upstream_port: int, certs: ServerCerts, workdir: Path) -> str:
    """nginx.conf for one server block; every runtime file lives in `workdir`."""
    listen = f"[{listen_host}]:{listen_port}" if ":" in listen_host else f"{listen_host}:{listen_port}"
    tmp = {name: workdir / f"nginx-{name}" for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    return f"""# Written by `fedhosp server`: the hospitals' address serves the Fleet API only.
daemon off;
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "nginx-error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    access_log {workdir / "nginx-access.log"};
    client_body_temp_path {tmp["body"]};
    proxy_temp_path {tmp["proxy"]};
    fastcgi_temp_path {tmp["fastcgi"]};
    uwsgi_temp_path {tmp["uwsgi"]};
    scgi_temp_path {tmp["scgi"]};
    server_tokens off;
    server {{
        listen {listen} ssl;
        ssl_certificate {certs.cert};
        ssl_certificate_key {certs.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size 0;  # model weights travel as request bodies
        # nginx matches the normalised path ('..', '%2e', '//' resolved) and, because proxy_pass
        # names a URI, forwards that normalised path: nothing outside /v1/fleet/ gets through.
        location {FLEET_PREFIX} {{
            limit_except POST {{ deny all; }}
            proxy_pass https://127.0.0.1:{upstream_port}{FLEET_PREFIX};
            proxy_http_version 1.1;
            proxy_ssl_trusted_certificate {certs.ca_cert};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_max_temp_file_size 0;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
        location / {{ return 404; }}
    }}
}}
"""


def command(nginx: str, config: Path) -> list[str]:
    return [nginx, "-c", str(config), "-e", str(config.parent / "nginx-error.log")]
