"""Flower ClientApp (a thin adapter over `Algorithm.client_update`); see the Flower milestone."""
