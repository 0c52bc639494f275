"""The `lorafleet` command: each command one call of the client (plus the server and service commands)."""
