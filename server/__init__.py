"""Flower ServerApp and strategy (thin adapters over `fedmeta.round.apply_round`); see the Flower milestone."""
