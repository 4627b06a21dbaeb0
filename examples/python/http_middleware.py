"""Flask middleware that asks tollgate before every request and answers with
the standard RateLimit headers (draft-ietf-httpapi-ratelimit-headers):
``RateLimit-Policy`` and ``RateLimit`` as tollgate wrote them,
``Retry-After`` in whole seconds when denied, and 429 Too Many Requests.

    python http_middleware.py --addr 127.0.0.1:50051 --listen 127.0.0.1:8080
    curl -i -H 'X-API-Key: k1' http://127.0.0.1:8080/

Prints ``listening http://HOST:PORT`` once it accepts requests (port 0: any
free port). Served by Werkzeug's development server: behind a real WSGI
server (gunicorn, uWSGI) the middleware is the same.
"""

import argparse
import math
import sys

import grpc
from flask import Flask, Response, g, request
from werkzeug.serving import make_server

import stubs

rate_pb2, rate_grpc, _, _ = stubs.load()


def rate_limit(app: Flask, stub, rule: str, fail_open: bool = True) -> None:
    """Limits each caller of `app` under `rule`: the caller is its API key
    (header X-API-Key) or else its IP address, prefixed so that a key can
    never be counted as an address. When tollgate itself cannot be reached,
    `fail_open` lets the request through (tollgate already answers by the
    rule's on_store_error when its store fails; this is for tollgate being
    down)."""

    @app.before_request
    def check():
        key = request.headers.get("X-API-Key")
        subject = f"key:{key}" if key else f"ip:{request.remote_addr}"
        try:
            answer = stub.CheckLimit(
                rate_pb2.CheckLimitRequest(rule=rule, subject=subject), timeout=0.5
            )
        except grpc.RpcError as err:
            # A subject tollgate refuses (say, a key over 256 bytes) is the
            # caller's fault: never let it skip the limit.
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                return Response("Bad Request\n", status=400)
            app.logger.warning("tollgate: %s", err.details())
            return None if fail_open else Response("Service Unavailable\n", status=503)
        g.tollgate = answer
        if not answer.allowed:
            retry = answer.retry_after
            seconds = retry.seconds + (1 if retry.nanos > 0 else 0)
            return Response(
                "Too Many Requests\n", status=429, headers={"Retry-After": str(seconds)}
            )
        return None

    @app.after_request
    def headers(response: Response) -> Response:
        # Runs for the 429 from check() too.
        answer = g.get("tollgate")
        if answer is not None:
            if answer.ratelimit_policy:
                response.headers["RateLimit-Policy"] = answer.ratelimit_policy
            if answer.ratelimit:
                response.headers["RateLimit"] = answer.ratelimit
        return response


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="127.0.0.1:50051")
    parser.add_argument("--listen", default="127.0.0.1:8080")
    parser.add_argument("--rule", default="api")
    args = parser.parse_args()

    app = Flask(__name__)
    channel = grpc.insecure_channel(args.addr)
    rate_limit(app, rate_grpc.RateLimiterStub(channel), args.rule)

    @app.get("/")
    def hello():
        return "hello\n"

    host, _, port = args.listen.rpartition(":")
    server = make_server(host, int(port), app, threaded=True)
    print(f"listening http://{host}:{server.server_port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
