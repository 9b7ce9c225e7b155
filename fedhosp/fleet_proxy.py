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

Only hospitals reach Flower: nginx asks every client for a certificate signed by the consortium
CA (`fedhosp certs sign`) and ends the TLS handshake of one that has none, before it can send a
byte of HTTP. `ssl_verify_client on` alone would not: nginx completes the handshake and answers
400 at the HTTP level (its verify callback lets every chain through, for `optional_no_ca`), so
OpenSSL's own verify mode is set to require a peer certificate (`ssl_conf_command VerifyMode`).
A certificate that does arrive but fails verification (another CA, expired) still completes the
handshake and gets nginx's 400, never the upstream. Flower's SuperNode cannot show a client
certificate itself; the site's tunnel (fedhosp/site_tunnel.py) does it for it.

The hospitals' address is on the open internet, so nginx also bounds what one client can
cost us before Flower sees a byte: request bodies no larger than the run's model needs
(`run_body_bytes`: the model this coordinator ships, as its run config builds it), a few
connections and a steady request rate per client address, and short timeouts for slow
senders. Flower's SuperNode makes unary calls with a 30 s client timeout
(flwr/supercore/protobuf/client.py), so no Fleet call legitimately takes longer.
"""

from __future__ import annotations

import functools
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import ConfigError
from fedhosp.certs import ServerCerts

if TYPE_CHECKING:
    from torch import nn

CONFIG = "nginx.conf"
FLEET_PREFIX = "/v1/fleet/"
NGINX_HINT = "install nginx (Debian/Ubuntu: apt-get install nginx-light) or pass --nginx PATH"
MIB = 1 << 20
PACKING_FACTOR = 2  # Flower's object packing, the protobuf envelope and headers, with room to spare
# Every other Fleet call (pull, heartbeat, metrics, config records) is small; a floor keeps a tiny model's
# limit from cutting into them.
MIN_BODY_BYTES = 8 * MIB
CONNECTIONS_PER_ADDRESS = 32  # a SuperNode keeps one or two; several sites may share one NAT address
REQUESTS_PER_SECOND, REQUEST_BURST = 50, 400  # a SuperNode polls about twice a second; rounds come in bursts
HEADER_TIMEOUT_S, BODY_TIMEOUT_S, UPSTREAM_TIMEOUT_S = 10, 30, 60


def run_body_bytes(run_config: Mapping[str, Any]) -> int:
    """The largest request body a site of this run may send: its model (task, model, channels, classes,
    image size, from `run_config` over the defaults) in float32, times PACKING_FACTOR. A registry-wide
    bound would be no bound: a linear head on scattering features grows with image size and class count
    (scatter-linear at 256 px and 1000 classes: 3.7 GiB)."""
    from common.config import RunConfig
    from common.models import REGISTRY

    cfg = RunConfig.from_mapping(run_config)
    return max_body_bytes(cfg.task, cfg.model, cfg.channels or REGISTRY[cfg.model].channels, cfg.num_classes,
                          cfg.image_size)


@functools.cache
def max_body_bytes(task: str, model: str, in_channels: int, num_classes: int, image_size: int) -> int:
    """`model`'s float32 weights times PACKING_FACTOR, rounded up to whole MiB, at least MIN_BODY_BYTES.
    Built on PyTorch's meta device: shapes only, nothing allocated."""
    import torch  # only when a config is written

    from common.models import build_model

    with torch.device("meta"):
        weights = _float32_bytes(build_model(task, model, in_channels, num_classes, image_size))
    return max(MIN_BODY_BYTES, math.ceil(weights * PACKING_FACTOR / MIB) * MIB)


def _float32_bytes(model: nn.Module) -> int:
    return sum(4 * tensor.numel() for tensor in model.state_dict().values())


def find_nginx(explicit: str | None = None) -> str:
    found = shutil.which(explicit or "nginx") or (shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
                                                  if not explicit else None)
    if not found:
        raise ConfigError(f"nginx not found: it keeps the Control API off the hospitals' address; {NGINX_HINT}")
    return found


def render(listen_host: str, listen_port: int, upstream_port: int, certs: ServerCerts, workdir: Path,
           max_body: int | None = None) -> str:
    """nginx.conf for one server block; every runtime file lives in `workdir`. `max_body`: bytes per request
    body (default: `run_body_bytes` of the default run); larger ones get 413 from nginx."""
    body_mib = math.ceil((max_body or run_body_bytes({})) / MIB)
    listen = f"[{listen_host}]:{listen_port}" if ":" in listen_host else f"{listen_host}:{listen_port}"
    tmp = {name: workdir / f"nginx-{name}" for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    return f"""# Written by `fedhosp server`: the hospitals' address serves the Fleet API only.
daemon off;
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "nginx-error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    # Which site (its certificate's subject), what it asked, what it got, and whether Flower saw it.
    log_format fleet '$remote_addr [$time_local] "$ssl_client_s_dn" "$request" $status $request_length '
                     'upstream=$upstream_addr';
    access_log {workdir / "nginx-access.log"} fleet;
    client_body_temp_path {tmp["body"]};
    proxy_temp_path {tmp["proxy"]};
    fastcgi_temp_path {tmp["fastcgi"]};
    uwsgi_temp_path {tmp["uwsgi"]};
    scgi_temp_path {tmp["scgi"]};
    server_tokens off;
    # Per client address: at most this many open connections and this request rate (excess waits in
    # the burst queue, beyond it gets 429); slow senders are cut off instead of holding a connection.
    limit_conn_zone $binary_remote_addr zone=per_address:1m;
    limit_req_zone $binary_remote_addr zone=fleet_rate:1m rate={REQUESTS_PER_SECOND}r/s;
    limit_conn_status 429;
    limit_req_status 429;
    client_header_timeout {HEADER_TIMEOUT_S}s;
    client_body_timeout {BODY_TIMEOUT_S}s;
    send_timeout {BODY_TIMEOUT_S}s;
    keepalive_timeout 65s;
    server {{
        listen {listen} ssl;
        ssl_certificate {certs.cert};
        ssl_certificate_key {certs.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        # Mutual TLS: a client certificate issued by the consortium CA itself (depth 1), or no handshake.
        ssl_client_certificate {certs.ca_cert};
        ssl_verify_client on;
        ssl_verify_depth 1;
        ssl_conf_command VerifyMode Require;
        limit_conn per_address {CONNECTIONS_PER_ADDRESS};
        limit_req zone=fleet_rate burst={REQUEST_BURST} delay={REQUEST_BURST // 4};
        client_max_body_size {body_mib}m;  # the run's model, packed (run_body_bytes)
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
            proxy_connect_timeout 10s;
            proxy_read_timeout {UPSTREAM_TIMEOUT_S}s;
            proxy_send_timeout {UPSTREAM_TIMEOUT_S}s;
        }}
        location / {{ return 404; }}
    }}
}}
"""


def command(nginx: str, config: Path) -> list[str]:
    return [nginx, "-c", str(config), "-e", str(config.parent / "nginx-error.log")]
