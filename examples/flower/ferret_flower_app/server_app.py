"""The ServerApp: samples clients, aggregates with the configured ferret algorithm, scores the model."""

from ferret.flower import server_app

app = server_app()
