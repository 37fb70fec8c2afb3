"""The federation server's public port: Flower's Fleet API (what SuperNodes call), and nothing else.

Flower 1.42's SuperLink serves its Fleet API (SuperNodes), its Control API (``flwr run``, ``flwr supernode
register``, ``flwr stop``: start any app, run its code on the server and on every site) and its Runtime API
(the ServerApp's own connection) on one port, and the open-source build has no account authentication for the
Control API.  So ``tcurlora federated server`` starts the SuperLink on 127.0.0.1 only and this gateway on the
address the sites connect to: it forwards ``POST /v1/fleet/CALL`` (CALL lower-case letters and dashes only, so
that no dot segment can lead out of the Fleet API) to the SuperLink unchanged (headers included, so Flower's
node authentication signatures reach the SuperLink) and answers every other path 404.

Run as ``python -m tcurlora.federated.gateway --listen HOST:PORT --superlink 127.0.0.1:PORT
(--tls-dir DIR | --insecure)``; it serves TLS with the SuperLink's certificate and verifies the SuperLink with
the federation's CA.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import ssl
import sys

FLEET_PREFIX = "/v1/fleet/"
FLEET_CALL = re.compile(r"[a-z][a-z-]*")  # Flower's Fleet calls: register-node, pull-messages, ...
#: One Fleet request: Flower sends arrays in chunks of 5 MB, a message's object tree and a FAB are smaller.
MAX_REQUEST_BYTES = 64 * 1024 * 1024
# connection-level headers: each hop sets its own
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host",
               "content-length", "proxy-authorization", "proxy-authenticate"}


def fleet_gateway(superlink: str, ca_file=None):
    """The ASGI app: Fleet requests forwarded to ``superlink`` (``https`` verified by ``ca_file``, else ``http``)."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    verify = ssl.create_default_context(cafile=str(ca_file)) if ca_file else False
    scheme = "https" if ca_file else "http"
    upstream = httpx.AsyncClient(base_url=f"{scheme}://{superlink}", verify=verify, timeout=300.0)

    async def forward(request: Request) -> Response:
        call = request.path_params["call"]
        if not FLEET_CALL.fullmatch(call):  # e.g. "..": the upstream URL would leave /v1/fleet/
            return PlainTextResponse("Not Found", status_code=404)
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_REQUEST_BYTES):
            return PlainTextResponse("request too large", status_code=413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_REQUEST_BYTES:
                return PlainTextResponse("request too large", status_code=413)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
        try:
            answer = await upstream.post(FLEET_PREFIX + call, content=bytes(body), headers=headers)
        except httpx.HTTPError:
            return PlainTextResponse("the federation's SuperLink is not reachable", status_code=502)
        return Response(answer.content, status_code=answer.status_code,
                        headers={k: v for k, v in answer.headers.items()
                                 if k.lower() not in HOP_HEADERS and k.lower() != "content-encoding"})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await upstream.aclose()

    return Starlette(routes=[Route(FLEET_PREFIX + "{call}", forward, methods=["POST"])], lifespan=lifespan)


def main(argv=None) -> int:
    from .processes import split_address
    from .tls import server_certificate_files

    parser = argparse.ArgumentParser(prog="python -m tcurlora.federated.gateway", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", required=True, metavar="HOST:PORT", help="the address the sites connect to")
    parser.add_argument("--superlink", required=True, metavar="127.0.0.1:PORT", help="the SuperLink on loopback")
    parser.add_argument("--tls-dir", metavar="DIR", help="ca.crt, server.pem, server.key")
    parser.add_argument("--insecure", action="store_true", help="no TLS (tests on one machine only)")
    args = parser.parse_args(argv)
    import uvicorn

    host, port = split_address(args.listen, "--listen")
    tls = server_certificate_files(args.tls_dir) if not args.insecure else None
    app = fleet_gateway(args.superlink, tls["ca"] if tls else None)
    # proxy_headers off: the gateway is the edge, no client-sent X-Forwarded-For is believed
    uvicorn.run(app, host=host, port=port, log_level="warning", proxy_headers=False, access_log=False,
                ssl_certfile=str(tls["cert"]) if tls else None, ssl_keyfile=str(tls["key"]) if tls else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
