"""The Flower ServerApp, a thin adapter: `fedmeta.loop.run` over the Grid Flower hands it (`server.grid`).

`flwr run .` loads `app`; `fedmeta simulate --engine ray` builds one with `make_server_app(config, options)`.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmeta.config import RunConfig
from server.grid import ServerOptions, parse_run_config, serve

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point under `flwr run`: the experiment comes from the run config ([tool.flwr.app.config])."""
    _ensure_logging()
    config, options = parse_run_config(dict(context.run_config))
    serve(grid, config, options)


def make_server_app(config: RunConfig, options: ServerOptions) -> ServerApp:
    """A ServerApp bound to an already validated config (used by the simulation entry point)."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        _ensure_logging()
        serve(grid, config, options)

    return bound


def _ensure_logging() -> None:
    """One INFO line per round from our loggers; HTTP and Flower internals stay at WARNING."""
    # The ServerApp may run in its own process (flwr-serverapp), where nothing has configured logging yet.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("server", "fedmeta"):
        logging.getLogger(name).setLevel(logging.INFO)
