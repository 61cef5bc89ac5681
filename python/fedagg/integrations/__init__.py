"""Integrations with training frameworks: ``torch`` (model <-> vector, participant updates, server
optimizers), ``flower`` (a Flower Message-API strategy) and ``nvflare`` (an NVFlare ModelAggregator).
Each is imported on its own and needs its framework (docs/integrations.md)."""
