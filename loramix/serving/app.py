"""The HTTP server: OpenAI's routes over the batching engine, metrics, health and the page.

Routes:
    GET  /                     the page (static files in `loramix/serving/page/`)
    GET  /v1/models            the one model served, with its experts, adapted modules and
                               the prompt rendering training used (`prompt_rendering`)
    POST /v1/chat/completions  chat template, `stream`, the X-LoRA extensions
    POST /v1/completions       prompts: a string, a list of strings, a list of token ids, or
                               a list of token-id lists
    GET  /health               200 {"status": "ok", ...}; 503 while draining
    GET  /metrics              Prometheus text format

The server is stateless (each request carries everything it needs), so replicas scale out
behind any HTTP load balancer. `run_server` runs uvicorn; on SIGTERM (or SIGINT) it refuses
new requests (503, and uvicorn closes its socket), lets running ones finish, and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramix.model import XLoraModel
from loramix.serving.config import ServeConfig
from loramix.serving.engine import Engine, EngineClosed, Job, TokenEvent
from loramix.serving.metrics import Metrics
from loramix.serving.protocol import ApiError, ChatRequest, CompletionRequest, fixed_weights, parse
from loramix.serving.responses import Answer

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError(
        f"loramix serve needs FastAPI and uvicorn ({error}); install the extra: "
        "pip install 'loramix[serve]'"
    ) from None

logger = logging.getLogger(__name__)

PAGE_DIR = Path(__file__).parent / "page"


@dataclass
class Service:
    """What the routes share: the model, its engine, metrics and the draining flag."""

    model: XLoraModel
    tokenizer: Any
    config: ServeConfig
    prompt_rendering: dict[str, Any] | None = None
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False
    engine: Engine = field(init=False)

    def __post_init__(self) -> None:
        self.engine = Engine(self.model, self.tokenizer, self.config.max_batch, self.metrics)
        text_config = self.model.config.get_text_config(decoder=True)
        self.context = int(getattr(text_config, "max_position_embeddings", 2048))


def create_app(
    model: XLoraModel,
    tokenizer: Any,
    config: ServeConfig,
    *,
    prompt_rendering: dict[str, Any] | None = None,
) -> FastAPI:
    """A FastAPI app serving `model`; its engine starts and stops with the app's lifespan.

    Args:
        model: The X-LoRA model.
        tokenizer: Its tokenizer.
        config: The server's settings.
        prompt_rendering: How training rendered prompts (`loramix.records.prompt_rendering`
            of the model's folder: `{"chat": bool, ...}`), or None when unknown. The model
            card shows it and the page follows it; a model trained on plain prompts gets a
            warning that `/v1/completions` matches its training.
    """
    service = Service(model, tokenizer, config, prompt_rendering=prompt_rendering)
    if prompt_rendering is not None and not prompt_rendering.get("chat"):
        logger.warning(
            "%s was trained on plain prompts (no chat template): /v1/completions matches its "
            "training; /v1/chat/completions renders the chat template, which training did not "
            "use, so its answers may be worse",
            config.model_name,
        )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.engine.start()
        try:
            yield
        finally:  # uvicorn has let the open requests finish by now
            service.draining = True
            await asyncio.to_thread(service.engine.close, 60.0)

    app = FastAPI(title="loramix", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        body = ApiError(str(error.detail), error.status_code, kind=kind).body()
        return JSONResponse(body, status_code=error.status_code)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE_DIR / "index.html")

    app.mount("/page", StaticFiles(directory=PAGE_DIR), name="page")

    @app.get("/health")
    async def health() -> JSONResponse:
        engine = service.engine
        status = "draining" if service.draining else "ok"
        body = {"status": status, "running": engine.running, "waiting": engine.waiting}
        return JSONResponse(body, status_code=503 if service.draining else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(service)]}

    @app.get("/v1/models/{name}")
    async def model_card(name: str) -> dict[str, Any]:
        _check_model(service, name)
        return _model_card(service)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _complete(service, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(service, request, chat=False)

    return app


def _model_card(service: Service) -> dict[str, Any]:
    return {
        "id": service.config.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "loramix",
        "experts": service.model.expert_names,
        "adapted_modules": service.model.adapted_modules,
        "scalings_mode": service.config.mode,
        "max_context_length": service.context,
        "prompt_rendering": _rendering_card(service.prompt_rendering),
    }


def _rendering_card(rendering: dict[str, Any] | None) -> dict[str, bool] | None:
    """`{"chat": bool}` as training rendered prompts (the template itself stays out); None if
    unknown."""
    return None if rendering is None else {"chat": bool(rendering.get("chat"))}


def _check_model(service: Service, name: str) -> None:
    if name != service.config.model_name:
        raise ApiError(
            f"The model {name!r} does not exist; this server serves "
            f"{service.config.model_name!r} (GET /v1/models)",
            status=404,
            param="model",
            code="model_not_found",
        )


# ------------------------------------------------------------------- completions


async def _complete(service: Service, request: Request, chat: bool) -> Response:
    route = "chat" if chat else "completions"
    try:
        response = await _start(service, request, chat)
    except ApiError as error:
        service.metrics.requests.labels(route, str(error.status)).inc()
        raise
    service.metrics.requests.labels(route, "200").inc()
    return response


async def _start(service: Service, request: Request, chat: bool) -> Response:
    arrived = time.monotonic()
    if service.draining:
        raise ApiError(
            "the server is shutting down; retry on another replica", 503, kind="unavailable"
        )
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(
            f"We could not parse the JSON body of your request ({error}); send a JSON object",
            code="invalid_json",
        ) from None
    body = parse(ChatRequest if chat else CompletionRequest, data)
    _check_model(service, body.model)
    prompts = _encode(service, body, chat)
    model = service.model
    fixed = fixed_weights(body, model.expert_names)
    mode = body.scalings_mode or service.config.mode
    stops = body.stop_strings()
    jobs, queue = [], asyncio.Queue()
    loop = asyncio.get_running_loop()
    for index, ids in enumerate(prompts):
        budget = _budget(service, body.token_budget(), len(ids), "messages" if chat else "prompt")

        def sink(event: Any, index: int = index) -> None:
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody listens
                loop.call_soon_threadsafe(queue.put_nowait, (index, event))

        jobs.append(
            Job(
                prompt_ids=ids,
                sink=sink,
                max_tokens=budget,
                temperature=body.temperature,
                top_p=body.top_p,
                seed=body.seed,
                n=body.n,
                stop=stops,
                mode=mode,
                fixed_weights=fixed,
                want_layers=body.return_layer_scalings,
                ignore_eos=body.ignore_eos,
            )
        )
    answer = Answer(
        chat=chat,
        model=service.config.model_name,
        experts=model.expert_names,
        adapted_modules=model.adapted_modules,
        mode="fixed" if fixed is not None else mode,
        n_choices=len(prompts) * body.n,
        prompt_tokens=sum(len(ids) for ids in prompts),
        want_weights=body.return_expert_weights,
        want_layers=body.return_layer_scalings,
    )
    try:
        for job in jobs:
            service.engine.submit(job)
    except EngineClosed as error:
        for job in jobs:
            job.cancel()
        raise ApiError(str(error), 503, kind="unavailable") from None
    events = _Events(service, answer, jobs, queue, body.n, arrived)
    if body.stream:
        return StreamingResponse(
            _stream(events, answer, body.include_usage()),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        while not answer.done:
            if not await events.next_batch(request):
                return Response(status_code=499)  # the client went away
    finally:
        events.close()
    if answer.error is not None:
        raise ApiError(f"generation failed: {answer.error}", 500, kind="server_error")
    return JSONResponse(answer.body())


def _encode(service: Service, body: Any, chat: bool) -> list[list[int]]:
    tokenizer = service.tokenizer
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(
                "this model's tokenizer has no chat template; use /v1/completions",
                param="messages",
            )
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts = [tokenizer(text, add_special_tokens=False).input_ids]
    elif isinstance(body.prompt, str):
        prompts = [tokenizer(body.prompt).input_ids]
    elif body.prompt and isinstance(body.prompt[0], int):
        prompts = [_token_ids(service, body.prompt, "prompt")]
    elif body.prompt and isinstance(body.prompt[0], list):  # a batch of tokenized prompts
        prompts = [_token_ids(service, ids, f"prompt.{i}") for i, ids in enumerate(body.prompt)]
    else:
        prompts = [tokenizer(p).input_ids for p in body.prompt]
        for i, ids in enumerate(prompts):
            if not ids:
                raise ApiError(f"prompt.{i}: empty; give at least one token", param=f"prompt.{i}")
    if not prompts or any(len(ids) == 0 for ids in prompts):
        raise ApiError("prompt: empty; give at least one token", param="prompt")
    return prompts


def _token_ids(service: Service, ids: list[int], place: str) -> list[int]:
    """A prompt given as token ids, checked: not empty, every id in the vocabulary."""
    if not ids:
        raise ApiError(f"{place}: empty; give at least one token", param=place)
    vocab = service.model.get_input_embeddings().weight.shape[0]
    for i, token in enumerate(ids):
        if not 0 <= token < vocab:
            raise ApiError(
                f"{place}.{i}: token ids must lie in [0, {vocab}) (got {token})",
                param=f"{place}.{i}",
                code="invalid_value",
            )
    return list(ids)


def _budget(service: Service, asked: int | None, prompt_tokens: int, prompt_param: str) -> int:
    """The completion's token budget; `prompt_param` (messages, prompt) names the prompt in
    the error when it alone leaves no room."""
    context = service.context
    room = context - prompt_tokens
    if room < 1 or (asked is not None and asked > room):
        raise ApiError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + (asked or 1)} tokens ({prompt_tokens} in the prompt, "
            f"{asked or 1} in the completion). Please reduce the prompt or max_tokens.",
            param=prompt_param if asked is None else "max_tokens",
            code="context_length_exceeded",
        )
    return asked if asked is not None else min(service.config.default_max_tokens, room)


class _Events:
    """Feeds the engine's events for one request into its `Answer`; cancels on close."""

    def __init__(
        self,
        service: Service,
        answer: Answer,
        jobs: list[Job],
        queue: asyncio.Queue,
        n: int,
        arrived: float,
    ) -> None:
        self.service, self.answer, self.jobs, self.queue, self.n = service, answer, jobs, queue, n
        self.arrived = arrived
        self.first_token = False
        self.checked = arrived  # when the client's connection was last checked

    async def next_batch(self, request: Request | None = None) -> bool:
        """Waits for events, then takes all that are ready; False if the client left.

        With `request` (plain responses), checks at most every 0.25 s whether its client is
        still there; streams notice it when a write fails.
        """
        while True:
            if request is not None and time.monotonic() - self.checked > 0.25:
                self.checked = time.monotonic()
                if await request.is_disconnected():
                    return False
            try:
                item = await asyncio.wait_for(self.queue.get(), timeout=0.25)
                break
            except TimeoutError:
                continue
        self._add(*item)
        while not self.queue.empty():
            self._add(*self.queue.get_nowait())
        return True

    def _add(self, job_index: int, event: Any) -> None:
        index = job_index * self.n + getattr(event, "choice", 0)
        if isinstance(event, TokenEvent) and not self.first_token:
            self.first_token = True
            self.service.metrics.first_token.observe(time.monotonic() - self.arrived)
        self.answer.add(index, event)

    def close(self) -> None:
        for job in self.jobs:
            job.cancel()  # no-op for finished jobs; frees the slots of a departed client
        if self.answer.done and self.answer.error is None:
            self.service.metrics.latency.observe(time.monotonic() - self.arrived)


async def _stream(events: _Events, answer: Answer, usage: bool) -> AsyncIterator[str]:
    marks: dict[int, int] = {}
    finished: set[int] = set()
    try:
        while not answer.done:
            await events.next_batch()
            if answer.error is not None:
                error = ApiError(f"generation failed: {answer.error}", 500, kind="server_error")
                yield f"data: {json.dumps(error.body())}\n\n"
                return
            chunk = answer.chunk(marks, finished)
            if chunk is not None:
                yield f"data: {json.dumps(chunk)}\n\n"
        if usage:
            yield f"data: {json.dumps(answer.usage_chunk())}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects: its sequences leave the batch
        events.close()


# ------------------------------------------------------------------------ running


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, which also marks the service as draining on SIGTERM / SIGINT."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.service.draining = True
        super().handle_exit(sig, frame)


def run_server(
    app: FastAPI, host: str = "127.0.0.1", port: int = 8000, **uvicorn_options: Any
) -> None:
    """Runs uvicorn until SIGTERM/SIGINT; running requests finish before it exits."""
    config = uvicorn.Config(app, host=host, port=port, **uvicorn_options)
    _DrainingServer(config, app.state.service).run()
