"""The Python way in: `Client()` speaks the HTTP API to a local or a team's server."""
