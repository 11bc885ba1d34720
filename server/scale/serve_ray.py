"""Replicas on Ray Serve, requests routed by adapter: `python -m server.scale.serve_ray --replicas N …`.

Two deployments:

- `AdapterServer` (N replicas): one whole server each — `build_runtime` + `create_app`, its own
  engine, host cache and slots — over the shared S3 store, so every replica serves every adapter and
  keeps its registry in step (server/scale/sync.py). Every route of the app comes along unchanged.
- `AdapterRouter` (the HTTP ingress behind Serve's proxy): reads which adapter a request names and
  calls a replica with Serve's model multiplexing, `multiplexed_model_id = "<owner>/<id>"`. Serve
  prefers a replica that has that id among its multiplexed models (`AdapterServer.adapter`, LRU,
  as many as the replica has slots), else the replica with the fewest, so an adapter's traffic stays
  where its weights already sit in a slot. Requests that name no adapter (and every other route) go
  to any replica (power of two choices). A client may pin the key itself with Serve's own
  `serve_multiplexed_model_id` header.

The router only peeks at the body: it authenticates nothing and forwards the request as received,
`Authorization` included; the replica answers 401/403/404 exactly as a single server does. It does
read the caller's key (when `--api-keys` is set) to know its tenant, because `my-lora` names a
different adapter for each tenant.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from adapters_store import AdapterError, AdapterRef, validate_adapter_id, validate_tenant
from server.config import ServerConfig, parse_args
from server.scale.asgi_bridge import HttpRequest, ResponseStart, call_asgi
from server.tenancy.keys import KeyRing
from server.tenancy.principal import OPERATOR

log = logging.getLogger(__name__)

APP_NAME = "adapter-server"
MULTIPLEX_HEADER = "serve_multiplexed_model_id"  # Serve's own header for choosing a multiplexed model
GENERATION_ROUTES = {"/generate": "adapter_id", "/v1/completions": "model", "/v1/chat/completions": "model"}
MAX_ONGOING = 1024  # the engine queues and batches; Serve should not hold requests back before it


def adapter_name(method: str, path: str, content_type: str, body: bytes) -> str | None:
    """The adapter a request names, as its caller wrote it (`id` or `owner/id`); None for none."""
    field = GENERATION_ROUTES.get(path.rstrip("/")) if method == "POST" else None
    if field is None or not content_type.startswith("application/json"):
        return None
    try:
        value = json.loads(body).get(field)
    except (ValueError, AttributeError):
        return None  # the replica answers the malformed body
    return value if isinstance(value, str) else None


async def upload_name(request: Request, body: bytes) -> str | None:
    """The adapter_id field of a multipart upload (POST /adapters): uploads go where the adapter will
    be served, which then has it parsed in memory already."""

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=2, max_fields=4)
    except Exception:  # python-multipart raises several types; the replica answers the broken body
        return None
    value = form.get("adapter_id")
    await form.close()
    return value if isinstance(value, str) else None


class RouteKeys:
    """Turns the adapter name in a request into the multiplexed model id: the adapter's full name
    `owner/id`, where a bare `id` belongs to the caller's tenant (as the replica will resolve it)."""

    def __init__(self, config: ServerConfig) -> None:
        self.keys = KeyRing.load(config.api_keys) if config.api_keys is not None else None
        self.base_name = config.model.resolve().name  # /v1 requests name the base model this way

    def key(self, name: str | None, authorization: str) -> str:
        if not name or name == self.base_name:
            return ""
        owner, slash, adapter_id = name.rpartition("/")
        tenant = owner if slash else self._tenant(authorization)
        if tenant is None:
            return ""  # no valid key: the replica answers 401, wherever it is
        try:
            return str(AdapterRef(validate_tenant(tenant), validate_adapter_id(adapter_id)))
        except (ValueError, AdapterError):  # not a valid name: the replica answers it
            return ""

    def _tenant(self, authorization: str) -> str | None:
        if self.keys is None:
            return OPERATOR.tenant
        scheme, _, key = authorization.partition(" ")
        principal = self.keys.authenticate(key.strip()) if scheme.lower() == "bearer" else None
        return None if principal is None else principal.tenant


def make_server_deployment(max_models: int):
    """The replica deployment; Serve's multiplexed set holds as many adapters as the replica has slots."""

    @serve.deployment(name="AdapterServer", max_ongoing_requests=MAX_ONGOING, health_check_period_s=5)
    class AdapterServer:
        async def __init__(self, config: ServerConfig) -> None:
            from server.app import create_app
            from server.runtime import build_runtime

            logging.basicConfig(
                level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            )
            self.runtime = build_runtime(config)
            self.app = create_app(self.runtime)
            self._lifespan = self.app.router.lifespan_context(self.app)  # starts the engine thread
            await self._lifespan.__aenter__()
            context = serve.get_replica_context()
            self.replica = context.replica_tag if context is not None else "local"

        async def __del__(self) -> None:
            # Serve calls this when it stops the replica: accepted uploads are published, the engine stops.
            await self._lifespan.__aexit__(None, None, None)

        def check_health(self) -> None:
            if not self.runtime.engine.alive:
                raise RuntimeError("the engine thread is not running")

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def adapter(self, key: str) -> str:
            """Nothing to load here: the engine brings the adapter into its host and slot tiers on the
            first request. This only makes Serve route the adapter's next requests to this replica."""
            return key

        async def handle(self, request: HttpRequest) -> AsyncIterator[ResponseStart | bytes]:
            key = serve.get_multiplexed_model_id()
            if key:
                await self.adapter(key)
            tier = self._tier(request.adapter) if request.adapter else None
            async for item in call_asgi(self.app, request):
                if isinstance(item, ResponseStart):
                    item = item.with_headers(self._headers(item.status, tier))
                yield item

        def _tier(self, key: str) -> str:
            """Where the adapter's current version was when the request arrived: slot, host or store."""
            tenant, _, adapter_id = key.partition("/")
            info = self.runtime.adapters.registry.resolve(AdapterRef(tenant, adapter_id))
            if info is None:
                return "none"
            if self.runtime.engine.scheduler.adapter_slots.slot_of(info.version) is not None:
                return "slot"
            return "host" if self.runtime.adapters.cache.resident(info.version) else "store"

        def _headers(self, status: int, tier: str | None) -> dict[str, str]:
            headers = {"x-replica": self.replica}
            if tier is not None and status < 300:  # a refused caller learns nothing about others' ids
                headers["x-adapter-tier"] = tier
                slots, host = self.runtime.engine.scheduler.adapter_slots.counts, self.runtime.adapters.cache.counts
                headers["x-replica-adapter-loads"] = f"slot={slots.loads},host={host.loads}"
            return headers

    return AdapterServer


@serve.deployment(name="AdapterRouter", max_ongoing_requests=4 * MAX_ONGOING, ray_actor_options={"num_cpus": 0})
class AdapterRouter:
    def __init__(self, servers, config: ServerConfig, route_by_adapter: bool = True) -> None:
        self.servers = servers
        self.route_keys = RouteKeys(config)
        self.route_by_adapter = route_by_adapter
        # The largest body any route takes in memory (the full fine-tune route streams to disk on a
        # single server; through the router it is capped here too).
        self.body_cap = int(max(config.adapters.max_upload_mb, config.max_request_mb) * 2**20)

    async def __call__(self, request: Request) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.body_cap:
                return JSONResponse(
                    {"error": {"message": f"body over {self.body_cap} bytes", "type": "request_too_large"}}, 413
                )
        http = HttpRequest(
            request.method,
            request.url.path,
            request.scope.get("query_string", b""),
            list(request.scope["headers"]),
            bytes(body),
            request.scope.get("client"),
        )
        http = replace(http, adapter=await self._adapter_key(request, http))
        key = (request.headers.get(MULTIPLEX_HEADER) or http.adapter) if self.route_by_adapter else ""
        handle = (
            self.servers.options(stream=True, multiplexed_model_id=key) if key else self.servers.options(stream=True)
        )
        stream = handle.handle.remote(http)
        start = await stream.__anext__()
        if not isinstance(start, ResponseStart):
            return JSONResponse({"error": {"message": "replica sent no response", "type": "internal_error"}}, 502)

        async def rest() -> AsyncIterator[bytes]:
            async for chunk in stream:
                yield chunk

        response = StreamingResponse(rest(), status_code=start.status)
        response.raw_headers = start.headers  # exactly the replica's (content-type, retry-after, …)
        return response

    async def _adapter_key(self, request: Request, http: HttpRequest) -> str:
        """`owner/id` of the adapter the request names, "" for none."""
        content_type = request.headers.get("content-type", "")
        if http.method == "POST" and http.path.rstrip("/") == "/adapters":
            name = await upload_name(request, http.body)
        else:
            name = adapter_name(http.method, http.path, content_type, http.body)
        return self.route_keys.key(name, request.headers.get("authorization", ""))


def build_app(
    config: ServerConfig,
    replicas: int,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
    env: dict[str, str] | None = None,
    route_by_adapter: bool = True,
):
    """The Serve application: `replicas` AdapterServers behind one AdapterRouter."""
    if replicas > 1 and not str(config.adapters_dir).startswith("s3://"):
        raise ValueError("replicas must share their adapters: use --adapters-dir s3://bucket/prefix (or --local-s3)")
    actor = {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}
    if env:
        actor["runtime_env"] = {"env_vars": dict(env)}
    server = make_server_deployment(config.adapters.max_slots).options(num_replicas=replicas, ray_actor_options=actor)
    return AdapterRouter.bind(server.bind(config), config, route_by_adapter)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m server.scale.serve_ray",
        description="Serve with N replicas on Ray Serve; every other flag is the server's (python -m server --help).",
    )
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs reserved per replica")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs per replica (1 = one GPU each)")
    parser.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start one here)")
    parser.add_argument(
        "--local-s3",
        type=Path,
        default=None,
        metavar="DIR",
        help="development: run SeaweedFS on loopback with its data in DIR and keep adapters there",
    )
    args, rest = parser.parse_known_args(argv)
    config = parse_args(rest)
    if config.threads == 0:  # each replica computes on the CPUs Ray reserved for it
        config = replace(config, threads=max(1, int(args.cpus_per_replica)))
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray

    from server.scale.local_s3 import local_s3

    signal.signal(signal.SIGTERM, _interrupt)  # docker stop, kill: shut down as on Ctrl-C
    with local_s3(args.local_s3) if args.local_s3 else nullcontext() as s3:
        env = {}
        if s3 is not None:
            env = s3.env
            config = replace(config, adapters_dir=s3.url("dev"))
            log.info("adapters in SeaweedFS at %s (%s, data in %s)", s3.endpoint, config.adapters_dir, args.local_s3)
        app = build_app(config, args.replicas, args.cpus_per_replica, args.gpus_per_replica, env)
        ray.init(address=args.ray_address, runtime_env={"env_vars": env} if env else None)
        signal.signal(signal.SIGTERM, _interrupt)  # ray.init installs a handler of its own
        try:
            serve.start(http_options={"host": config.host, "port": config.port})
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
            log.info("serving on http://%s:%d with %d replicas", config.host, config.port, args.replicas)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            log.info("stopping: replicas finish their requests and publish accepted uploads")
        finally:
            serve.shutdown()
            ray.shutdown()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main(sys.argv[1:])
