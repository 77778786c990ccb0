"""`loramix serve`: an OpenAI-compatible HTTP server for X-LoRA models, and a page that shows it.

Modules:
    config.py    ServeConfig: the server's settings (and its command-line flags)
    kv.py        joining and trimming the two KV caches of a running batch (left padding)
    engine.py    the continuous-batching scheduler: one worker thread runs the model
    protocol.py  OpenAI request schemas, the X-LoRA extensions, OpenAI error objects
    metrics.py   Prometheus metrics
    app.py       the FastAPI routes (`/v1/...`, `/health`, `/metrics`, the page at `/`)
    page/        the page's static files (no build step, no CDN)

FastAPI and uvicorn come with the `serve` extra: `pip install 'loramix[serve]'`.
"""
