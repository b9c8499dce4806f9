"""The ClientApp: keeps a replica of the global model and trains its partition (node config `partition-id`)."""

from ferret.flower import client_app

app = client_app()
