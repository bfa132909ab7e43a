"""Serving a run's export over an OpenAI-style HTTP API with Ray Serve.

model.py   the export (base model + task adapters) and the batched decode loop (no Ray)
protocol.py request bodies (pydantic, OpenAI field names) and error bodies
api.py     FastAPI routes, auth, server-sent events
app.py     the Ray Serve deployment (batching, overload) and `build_app` for `serve run`/KubeRay
server.py  `distlm serve`: start or join Ray, deploy, block until Ctrl-C
"""
