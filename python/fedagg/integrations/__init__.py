"""Integrations with training frameworks (``fedagg.integrations.torch``; more to come)."""
