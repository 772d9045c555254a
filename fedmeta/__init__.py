"""fedmeta: federated meta-learning as pure functions over parameter dicts.

This package is transport-free: it never imports flwr, ray or grpc. The client part of every algorithm
(`Algorithm.client_update`) and the server part (`fedmeta.round.apply_round`) are plain functions that the
in-process loop, Flower's Ray simulation and a gRPC deployment all call the same way.
"""

__version__ = "0.1.0"
