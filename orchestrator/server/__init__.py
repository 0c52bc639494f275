"""The HTTP API (FastAPI) over the service, and the local service that runs one server per home."""
