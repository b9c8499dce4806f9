"""ferret on Flower: the ServerApp and ClientApp come from ferret.flower."""
