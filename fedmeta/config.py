"""Run configuration: one frozen dataclass per concern, each validated where it is built.

Every check names the offending value, so a typo on the command line or in a preset fails before any work.
Algorithm code never sees these objects whole; it receives the plain numbers it needs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

# The registry's names (fedmeta.algorithms.ALGORITHMS, checked equal by a test), here without importing torch.
ALGORITHM_NAMES = (
    "maml",
    "fomaml",
    "anil",
    "metasgd",
    "reptile",
    "protonet",
    "matching",
    "siamese",
    "relation",
    "metalstm",
    "perfedavg",
    "perfedavg-hf",
    "fedrep",
)
# Metric-based methods: classification only, an embedding model evaluated at any number of ways.
EMBEDDING_ALGORITHMS = ("protonet", "matching", "siamese", "relation")
BASELINE_NAMES = ("fedavg",)
DATASETS = ("sinusoid", "omniglot", "femnist", "shakespeare")
# Naturally partitioned datasets, where a task can be a client's own data (episode.client_tasks).
CLIENT_TASK_DATASETS = ("femnist", "shakespeare")
# Algorithms that adapt a model over the global label space (client tasks); not the metric-based ones.
CLIENT_TASK_ALGORITHMS = (
    "maml",
    "fomaml",
    "anil",
    "metasgd",
    "reptile",
    "metalstm",
    "perfedavg",
    "perfedavg-hf",
    "fedrep",
)
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "linear", "cosine")
REPLIES = ("rows", "sum")
INNER_OPTIMIZERS = ("sgd", "adam")
ADAM_STATES = ("task", "carried")
OMNIGLOT_PARTITIONS = ("alphabet", "alphabet-drawer", "character")
OMNIGLOT_SPLITS = ("lake", "vinyals")
CONV_DOWNSAMPLING = ("stride", "maxpool", "maxpool3")
PRIVACY_MODES = ("off", "central", "distributed", "local")
AGGREGATORS = ("mean", "median", "trimmed-mean")
DEVICES = ("cpu", "cuda", "auto")
PRECISIONS = ("fp32", "bf16")


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent with another one."""


def option(default: Any, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its documentation: the one place its default, help text and choices are written.

    `flag`: the `fedmeta simulate` option that sets it (`simulations.cli` builds the parser from these);
    `choices`: the values it accepts, shown in the help. Flower's run-config keys are the dotted field names
    (`RunConfig.to_flat`), checked against `pyproject.toml` by a test.
    """
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive_int(name: str, value: Any) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"{name} must be a positive integer, got {value!r}",
    )


def parse_override(item: str) -> tuple[str, Any]:
    """A `KEY=VALUE` override from a command line (`outer.eps=1e-3`, `outer.schedule=cosine`): the value read as
    JSON, or kept as a bare string."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"an override is KEY=VALUE (e.g. outer.eps=1e-3), got {item!r}")
    try:
        return key, json.loads(text)
    except json.JSONDecodeError:
        return key, text


def _positive_float(name: str, value: Any) -> None:
    _require(
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0,
        f"{name} must be a positive finite number, got {value!r}",
    )


@dataclass(frozen=True)
class DataConfig:
    """Which task family, and how it is split into clients."""

    dataset: str = option(
        "sinusoid",
        "task family: sinusoid (built in), omniglot, femnist (LEAF's writers) or shakespeare (speakers)",
        flag="--dataset",
        choices=DATASETS,
    )
    data_dir: str | None = option(
        None, "benchmark data directory (unset: $FEDMETA_DATA_DIR, then ./data)", flag="--data-dir"
    )
    num_train_clients: int = option(
        100, "training clients (sinusoid; omniglot --partition character)", flag="--num-train-clients"
    )
    num_unseen_clients: int = option(
        20,
        "unseen clients, evaluation only (sinusoid; femnist, shakespeare: clients held out)",
        flag="--num-unseen-clients",
    )
    client_window: float = option(
        0.3, "sinusoid: each client's window of the amplitude and phase ranges (non-IID), as a fraction"
    )
    partition: str = option(
        "alphabet",
        "omniglot clients: one per alphabet, per (alphabet, group of drawers), or the training characters dealt "
        "at random to --num-train-clients clients (IID)",
        flag="--partition",
        choices=OMNIGLOT_PARTITIONS,
    )
    drawers_per_client: int = option(
        5, "omniglot alphabet-drawer partition: drawers per client", flag="--drawers-per-client"
    )
    split: str = option(
        "lake",
        "omniglot: lake (background alphabets train, evaluation alphabets are unseen clients) or vinyals (the "
        "papers' split: 1,200 training characters, the 423 test characters one unseen client)",
        flag="--split",
        choices=OMNIGLOT_SPLITS,
    )

    femnist_variant: str = option(
        "leaf_niid_sf005",
        "femnist: the LEAF folder under DATA_DIR/femnist/ (train/ and test/ JSON files)",
        flag="--femnist-variant",
    )
    min_samples: int = option(
        10,
        "femnist, shakespeare: clients with fewer samples (images; 80-character windows) are left out",
        flag="--min-samples",
    )
    lstm_hidden: int = option(
        256,
        "shakespeare: the width of each of the character LSTM's two layers (LEAF's: 256; narrower fits a CPU)",
        flag="--lstm-hidden",
    )
    conv_downsample: str = option(
        "stride",
        "omniglot, femnist: how the Conv4 net halves its maps - stride-2 convolutions (MAML's Omniglot net, "
        "256 features) or 2x2 max-pooling after each block (the ProtoNet and Matching Networks papers' net, 64 "
        "features, about 4x the compute), or max-pooling after the first three blocks only (maxpool3: the same "
        "compute, a 64x3x3 = 576-number embedding; measured worse for ProtoNet, benchmarks/RESULTS.md)",
        flag="--conv-downsample",
        choices=CONV_DOWNSAMPLING,
    )
    conv_channels: int = option(
        64,
        "omniglot, femnist: the Conv4 net's channels per block (64 in the MAML and ProtoNet papers; 128 took "
        "3.3x the time of a ProtoNet round in an hour-long run and scored no better in the hour)",
        flag="--conv-channels",
    )

    def __post_init__(self) -> None:
        _require(self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        _positive_int("min_samples", self.min_samples)
        _positive_int("lstm_hidden", self.lstm_hidden)
        _positive_int("conv_channels", self.conv_channels)
        _require(
            self.conv_downsample in CONV_DOWNSAMPLING,
            f"conv_downsample must be one of {CONV_DOWNSAMPLING}, got {self.conv_downsample!r}",
        )
        _require(
            isinstance(self.femnist_variant, str) and self.femnist_variant.strip() != "",
            f"femnist_variant must be a folder name, got {self.femnist_variant!r}",
        )
        _positive_int("num_train_clients", self.num_train_clients)
        _positive_int("num_unseen_clients", self.num_unseen_clients)
        _require(
            isinstance(self.client_window, int | float) and 0 < self.client_window <= 1,
            f"client_window must be in (0, 1], got {self.client_window!r}",
        )
        _require(self.split in OMNIGLOT_SPLITS, f"split must be one of {OMNIGLOT_SPLITS}, got {self.split!r}")
        _require(
            self.partition in OMNIGLOT_PARTITIONS,
            f"partition must be one of {OMNIGLOT_PARTITIONS}, got {self.partition!r}",
        )
        _require(
            isinstance(self.drawers_per_client, int)
            and 1 <= self.drawers_per_client <= 20
            and 20 % self.drawers_per_client == 0,
            f"drawers_per_client must divide the 20 Omniglot drawers, got {self.drawers_per_client!r}",
        )


@dataclass(frozen=True)
class EpisodeConfig:
    """Shape of one task: N-way K-shot with Q queries per class (classification), or K-shot regression."""

    ways: int = option(5, "classes per task (N-way)", flag="--ways")
    shots: int = option(10, "support examples per class (K-shot; regression: support points)", flag="--shots")
    queries: int = option(10, "query examples per class (regression: query points)", flag="--queries")
    train_ways: int | None = option(
        None,
        "ways of the training episodes (unset: --ways); Prototypical Networks train 60-way for 5-way tests "
        "(arXiv:1703.05175 sec. 3.1); metric methods only, a head's outputs are fixed",
        flag="--train-ways",
    )
    train_shots: int | None = option(
        None,
        "shots of the training episodes (unset: --shots); Reptile trains 1-shot models on 10-shot tasks "
        "(arXiv:1803.02999 appendix A)",
        flag="--train-shots",
    )
    train_queries: int | None = option(
        None,
        "queries of the training episodes (unset: --queries); 0 only for reptile, which trains on support and "
        "query pooled",
        flag="--train-queries",
    )
    augment: float = option(
        0.0,
        "training episodes of images only: a random affine distortion of every image (Koch et al. 2015: rotation "
        "+-10 degrees, shear +-0.3, scale 0.8-1.2, shift +-2 pixels in 105), the ranges times this factor; 0: off",
        flag="--augment",
    )
    joint_embedding: bool = option(
        False,
        "metric methods: embed a task's support and query images in one forward pass, so that batch norm "
        "normalises both with one set of statistics (the Prototypical Networks reference code's encoder call)",
        flag="--joint-embedding",
    )

    client_tasks: bool = option(
        False,
        "FedMeta's tasks (arXiv:1802.07876): a client's own data split into support and query over the global "
        "labels, instead of N-way K-shot episodes (femnist)",
        flag="--client-tasks",
    )
    support: float = option(
        0.2,
        "--client-tasks: the support part of a client's data, a fraction (< 1) or a count (>= 1)",
        flag="--support",
    )
    client_samples: int | None = option(
        None,
        "--client-tasks: samples drawn per task from the client's data (unset: all of them)",
        flag="--client-samples",
    )

    def __post_init__(self) -> None:
        _require(isinstance(self.client_tasks, bool), f"client_tasks must be true or false, got {self.client_tasks!r}")
        _require(
            isinstance(self.joint_embedding, bool),
            f"joint_embedding must be true or false, got {self.joint_embedding!r}",
        )
        _positive_float("support", self.support)
        if self.client_samples is not None:
            _positive_int("client_samples", self.client_samples)
        _require(
            self.support < 1 or float(self.support).is_integer(),
            f"support must be a fraction below 1 or a whole count, got {self.support!r}",
        )
        _require(
            isinstance(self.augment, int | float)
            and not isinstance(self.augment, bool)
            and math.isfinite(self.augment)
            and 0 <= self.augment <= 2,
            f"augment must be a factor in [0, 2], got {self.augment!r}",
        )
        _positive_int("ways", self.ways)
        _positive_int("shots", self.shots)
        _positive_int("queries", self.queries)
        if self.train_ways is not None:
            _positive_int("train_ways", self.train_ways)
        if self.train_shots is not None:
            _positive_int("train_shots", self.train_shots)
        if self.train_queries is not None:
            _require(
                isinstance(self.train_queries, int) and self.train_queries >= 0,
                f"train_queries must be a non-negative integer, got {self.train_queries!r}",
            )

    @property
    def training_ways(self) -> int:
        return self.ways if self.train_ways is None else self.train_ways

    @property
    def training_shots(self) -> int:
        return self.shots if self.train_shots is None else self.train_shots

    @property
    def training_queries(self) -> int:
        return self.queries if self.train_queries is None else self.train_queries


@dataclass(frozen=True)
class InnerConfig:
    """The client's inner loop (task adaptation)."""

    inner_steps: int = option(5, "adaptation steps of the client's inner loop", flag="--inner-steps")
    inner_lr: float = option(0.02, "inner-loop learning rate", flag="--inner-lr")
    eval_steps: int = option(
        10, "adaptation steps measured at evaluation (the metric after 0..N steps)", flag="--eval-steps"
    )
    inner_optimizer: str = option(
        "sgd",
        "sgd, or adam with beta1 0 and fresh state per task (Reptile, arXiv:1803.02999 sec. 6)",
        flag="--inner-optimizer",
        choices=INNER_OPTIMIZERS,
    )
    inner_batch: int = option(0, "examples per inner step, strided minibatches (0: all)", flag="--inner-batch")
    adam_state: str = option(
        "task",
        "the inner Adam's second moments: fresh for every task, or carried across tasks and rounds in the "
        "meta-parameters (reptile, as the paper's code)",
        flag="--inner-adam-state",
        choices=ADAM_STATES,
    )

    def __post_init__(self) -> None:
        _require(
            isinstance(self.inner_steps, int) and self.inner_steps >= 0,
            f"inner_steps must be a non-negative integer, got {self.inner_steps!r}",
        )
        _positive_float("inner_lr", self.inner_lr)
        _require(
            isinstance(self.eval_steps, int) and self.eval_steps >= 0,
            f"eval_steps must be a non-negative integer, got {self.eval_steps!r}",
        )
        _require(
            self.inner_optimizer in INNER_OPTIMIZERS,
            f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {self.inner_optimizer!r}",
        )
        _require(
            isinstance(self.inner_batch, int) and self.inner_batch >= 0,
            f"inner_batch must be a non-negative integer (0: all examples), got {self.inner_batch!r}",
        )
        _require(self.adam_state in ADAM_STATES, f"adam_state must be one of {ADAM_STATES}, got {self.adam_state!r}")


@dataclass(frozen=True)
class OuterConfig:
    """The server's outer optimizer, whose state persists across rounds."""

    optimizer: str = option("adam", "the server's optimizer", flag="--outer-optimizer", choices=OPTIMIZERS)
    outer_lr: float = option(0.01, "outer (server) learning rate", flag="--outer-lr")
    beta1: float = option(0.9, "adam: first-moment decay")
    beta2: float = option(0.999, "adam: second-moment decay")
    eps: float = option(1e-8, "adam: epsilon")
    schedule: str = option(
        "constant",
        "outer lr over the rounds: constant, or annealed to --final-outer-lr linearly (Reptile) or along a half "
        "cosine (MAML++)",
        flag="--outer-schedule",
        choices=SCHEDULES,
    )
    final_lr: float = option(0.0, "the outer lr that linear and cosine schedules anneal to", flag="--final-outer-lr")

    def __post_init__(self) -> None:
        _require(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _positive_float("outer_lr", self.outer_lr)
        _require(self.schedule in SCHEDULES, f"outer.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _require(
            isinstance(self.final_lr, int | float) and not isinstance(self.final_lr, bool) and self.final_lr >= 0,
            f"outer.final_lr must be a non-negative number, got {self.final_lr!r}",
        )
        _require(0 <= self.beta1 < 1, f"beta1 must be in [0, 1), got {self.beta1!r}")
        _require(0 <= self.beta2 < 1, f"beta2 must be in [0, 1), got {self.beta2!r}")
        _positive_float("eps", self.eps)


@dataclass(frozen=True)
class FederationConfig:
    """Rounds and client sampling."""

    rounds: int = option(200, "federated rounds (outer steps)", flag="--rounds")
    clients_per_round: int = option(10, "clients sampled per round (at most all of them)", flag="--clients-per-round")
    client_fraction: float | None = option(
        None, "fraction of the training clients per round; overrides --clients-per-round", flag="--client-fraction"
    )
    tasks_per_client: int = option(4, "tasks each sampled client trains on per round", flag="--tasks-per-client")
    seed: int = option(0, "run seed: clients, tasks and initial weights are functions of it", flag="--seed")
    time_budget: float | None = option(
        None,
        "minutes: stop after the round that crosses this much training (the outer schedule still spans --rounds)",
        flag="--time-budget",
    )
    fit_rounds: bool = option(
        False,
        "with --time-budget: time the first rounds, then spread the outer schedule over the rounds that fit the "
        "budget (at most --rounds); fitted again at the pace since, at each tenth of the budget up to half",
        flag="--fit-rounds",
    )

    def __post_init__(self) -> None:
        _positive_int("rounds", self.rounds)
        if self.time_budget is not None:
            _positive_float("time_budget (minutes)", self.time_budget)
        _require(isinstance(self.fit_rounds, bool), f"fit_rounds must be true or false, got {self.fit_rounds!r}")
        _require(
            not self.fit_rounds or self.time_budget is not None,
            "federation.fit_rounds fits the rounds to federation.time_budget, which is not set",
        )
        _positive_int("clients_per_round", self.clients_per_round)
        if self.client_fraction is not None:
            _require(
                isinstance(self.client_fraction, int | float) and 0 < self.client_fraction <= 1,
                f"client_fraction must be in (0, 1], got {self.client_fraction!r}",
            )
        _positive_int("tasks_per_client", self.tasks_per_client)
        _require(
            isinstance(self.seed, int) and self.seed >= 0, f"seed must be a non-negative integer, got {self.seed!r}"
        )

    def clients_in_round(self, num_clients: int) -> int:
        """How many of `num_clients` take part in one round (at least one, at most all)."""
        if self.client_fraction is not None:
            return max(1, min(num_clients, round(self.client_fraction * num_clients)))
        return min(num_clients, self.clients_per_round)


@dataclass(frozen=True)
class EvalConfig:
    """Personalised evaluation on unseen clients and the FedAvg baseline it is compared with."""

    eval_clients: int = option(20, "unseen clients evaluated", flag="--eval-clients")
    eval_tasks_per_client: int = option(20, "tasks per unseen client at evaluation", flag="--eval-tasks")
    fedavg_rounds: int | None = option(
        None, "rounds of the FedAvg baseline (unset: as many as the run; 0 skips it)", flag="--fedavg-rounds"
    )
    fedavg_local_steps: int = option(5, "FedAvg baseline: local SGD steps per client and round")
    fedavg_lr: float = option(0.02, "FedAvg baseline: local learning rate")
    fedavg_batch: int = option(20, "FedAvg baseline: minibatch size")
    curve_every: int = option(
        0, "score the meta-model on unseen clients every N rounds (learning curve; 0: off)", flag="--curve-every"
    )
    curve_tasks_per_client: int = option(2, "learning curve: tasks per unseen client")

    def __post_init__(self) -> None:
        _positive_int("eval_clients", self.eval_clients)
        _require(
            isinstance(self.curve_every, int) and self.curve_every >= 0,
            f"curve_every must be a non-negative integer, got {self.curve_every!r}",
        )
        _positive_int("curve_tasks_per_client", self.curve_tasks_per_client)
        _positive_int("eval_tasks_per_client", self.eval_tasks_per_client)
        if self.fedavg_rounds is not None:
            _require(
                isinstance(self.fedavg_rounds, int) and self.fedavg_rounds >= 0,
                f"fedavg_rounds must be a non-negative integer, got {self.fedavg_rounds!r}",
            )
        _positive_int("fedavg_local_steps", self.fedavg_local_steps)
        _positive_float("fedavg_lr", self.fedavg_lr)
        _positive_int("fedavg_batch", self.fedavg_batch)


@dataclass(frozen=True)
class PrivacyConfig:
    """Client-level differential privacy of the meta-update (DP-FedAvg, McMahan et al. 2018, arXiv:1710.06963).

    central: the (trusted) server clips every update to `clip_norm` and adds N(0, (z C)^2) to their sum.
    distributed: every client clips and adds its 1/m share of that noise (for use with secure aggregation).
    local: every client clips and adds the full N(0, (z C)^2) itself (untrusted server; far noisier).
    """

    mode: str = option(
        "off", "client-level differential privacy: where the noise is added", flag="--dp", choices=PRIVACY_MODES
    )
    clip_norm: float = option(1.0, "DP: L2 bound C of every client update", flag="--clip-norm")
    noise_multiplier: float = option(1.0, "DP: the noise std on the sum is z * C", flag="--noise-multiplier")
    adaptive_clipping: bool = option(
        False,
        "DP: move C towards a quantile of the update norms (Andrew et al. 2021, arXiv:1905.03871), with a noised "
        "count (std m / 20) paid from the same budget",
        flag="--adaptive-clipping",
    )
    target_quantile: float = option(0.5, "adaptive clipping: the quantile of update norms C tracks")
    clip_lr: float = option(0.2, "adaptive clipping: the geometric step of C")
    delta: float | None = option(None, "DP: delta of the reported epsilon (unset: 1/N^1.1)", flag="--delta")
    target_epsilon: float | None = option(
        None, "DP: refuse to start if the planned rounds would spend more", flag="--target-epsilon"
    )
    reproducible_noise: bool = option(
        False,
        "seed the DP noise from the run seed (research only: anyone who knows the seed could subtract it; off, "
        "the noise comes from the operating system's entropy)",
    )

    def __post_init__(self) -> None:
        _require(self.mode in PRIVACY_MODES, f"privacy mode must be one of {PRIVACY_MODES}, got {self.mode!r}")
        _positive_float("clip_norm", self.clip_norm)
        _require(
            isinstance(self.noise_multiplier, int | float)
            and math.isfinite(self.noise_multiplier)
            and self.noise_multiplier >= 0,
            f"noise_multiplier must be >= 0, got {self.noise_multiplier!r}",
        )
        _require(0 < self.target_quantile < 1, f"target_quantile must be in (0, 1), got {self.target_quantile!r}")
        _positive_float("clip_lr", self.clip_lr)
        if self.delta is not None:
            _require(
                isinstance(self.delta, float) and 0 < self.delta < 1, f"delta must be in (0, 1), got {self.delta!r}"
            )
        if self.target_epsilon is not None:
            _positive_float("target_epsilon", self.target_epsilon)
            _require(self.mode != "off", "target_epsilon needs a privacy mode other than 'off'")
        if self.adaptive_clipping:
            # The noised count of unclipped updates is computed by the server from individual norms.
            _require(self.mode == "central", f"adaptive_clipping needs privacy mode 'central', got {self.mode!r}")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


@dataclass(frozen=True)
class RobustConfig:
    """Defences of the meta-update against broken or malicious clients (applied by the server)."""

    aggregator: str = option(
        "mean",
        "mean (task-weighted), or coordinate-wise median / trimmed-mean with every client counting once",
        flag="--aggregator",
        choices=AGGREGATORS,
    )
    trim_fraction: float = option(
        0.1, "trimmed-mean: fraction of clients dropped at each end, per coordinate", flag="--trim-fraction"
    )
    max_update_norm: float | None = option(
        None, "reject (and log) client updates with a larger L2 norm (unset: no bound)", flag="--max-update-norm"
    )

    def __post_init__(self) -> None:
        _require(
            self.aggregator in AGGREGATORS, f"robust.aggregator must be one of {AGGREGATORS}, got {self.aggregator!r}"
        )
        _require(
            isinstance(self.trim_fraction, int | float) and 0 <= self.trim_fraction < 0.5,
            f"robust.trim_fraction must be in [0, 0.5), got {self.trim_fraction!r}",
        )
        if self.max_update_norm is not None:
            _positive_float("robust.max_update_norm", self.max_update_norm)


@dataclass(frozen=True)
class MamlConfig:
    """MAML++ (Antoniou et al. 2019, arXiv:1810.09502) as options of `maml`; all off is plain MAML.

    The cosine-annealed outer learning rate is `outer.schedule = "cosine"`. MAML++'s epochs are rounds here.
    """

    multi_step_loss: bool = option(False, "MSL: the query losses after every step, weighted", flag="--multi-step-loss")
    msl_anneal_rounds: int = option(
        100, "MSL: rounds over which the weights anneal to the last step only", flag="--msl-anneal-rounds"
    )
    per_step_lr: bool = option(
        False, "LSLR: learned inner learning rates per parameter tensor and step", flag="--per-step-lr"
    )
    per_step_bn: bool = option(False, "BNWB: batch-norm weights and biases per inner step", flag="--per-step-bn")
    first_order_rounds: int = option(
        0, "DA: first-order meta-gradients for this many rounds, then second order", flag="--first-order-rounds"
    )

    def __post_init__(self) -> None:
        for name in ("multi_step_loss", "per_step_lr", "per_step_bn"):
            value = getattr(self, name)
            _require(isinstance(value, bool), f"maml.{name} must be true or false, got {value!r}")
        for name in ("msl_anneal_rounds", "first_order_rounds"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                f"maml.{name} must be a non-negative integer, got {value!r}",
            )

    @property
    def enabled(self) -> bool:
        return self != MamlConfig(msl_anneal_rounds=self.msl_anneal_rounds)


@dataclass(frozen=True)
class MatchingConfig:
    """Matching Networks' full-context embeddings (Vinyals et al. 2016, sec. 2.1.2) and metric scaling as
    options of `matching`."""

    fce: bool = option(
        False,
        "full-context embeddings: a bidirectional LSTM over the support set, an attention LSTM for queries",
        flag="--fce",
    )
    fce_steps: int = option(5, "the attention LSTM's processing steps K (with --fce)", flag="--fce-steps")
    scale: float = option(
        1.0,
        "the factor on the cosine similarities before the attention's softmax (1: the paper's; TADAM's metric "
        "scaling, arXiv:1805.10123, lets a 20-way attention be confident)",
        flag="--matching-scale",
    )

    def __post_init__(self) -> None:
        _require(isinstance(self.fce, bool), f"matching.fce must be true or false, got {self.fce!r}")
        _positive_int("matching.fce_steps", self.fce_steps)
        _positive_float("matching.scale", self.scale)

    @property
    def enabled(self) -> bool:
        return self.fce or self.scale != 1.0


@dataclass(frozen=True)
class PerFedAvgConfig:
    """Per-FedAvg's local meta-step (Fallah et al. 2020, arXiv:2002.07948, Algorithm 1)."""

    local_lr: float = option(
        0.001, "Per-FedAvg's beta: the step of each local meta-update (one per task)", flag="--perfedavg-beta"
    )

    def __post_init__(self) -> None:
        _positive_float("perfedavg.local_lr", self.local_lr)


@dataclass(frozen=True)
class ComputeConfig:
    """Where and how a client computes its part. None of this changes the maths, only its speed and rounding.

    The batched engine computes all of a client's tasks in one vectorised call (`fedmeta.batched`); the per-task
    loop is the readable reference it is tested against.
    """

    device: str = option(
        "cpu",
        "where clients compute: cpu, cuda, or auto (cuda when torch sees a GPU)",
        flag="--device",
        choices=DEVICES,
    )
    batched: bool = option(
        True,
        "compute a client's tasks in one vectorised call; off (--task-loop): one by one, the reference path",
        flag="--task-loop",
    )
    cohorts: bool = option(
        True,
        "compute all of a worker's sampled clients in one vectorised call where the algorithm allows it (each "
        "client's update is what it computes alone); off (--client-loop): one client after another",
        flag="--client-loop",
    )
    workers: int = option(
        0,
        "Flower nodes as cohort workers: 0 - one node per client (the federation's partitions); W - W nodes, node "
        "p computing every client c with c mod W = p (training and unseen), all of a round's in one call",
        flag="--workers",
    )
    reply: str = option(
        "rows",
        "what a cohort sends the server: rows - every client's update; sum - their weighted sum and its weight, one "
        "model-sized message (the mean is the same to float64 rounding); needs the mean aggregator and a fixed "
        "clip norm, and on Flower --workers",
        flag="--cohort-reply",
        choices=REPLIES,
    )
    task_chunk: int = option(
        0,
        "at most N tasks per vectorised call, to bound memory (0: on a CPU 8 Omniglot episodes' worth, at least "
        "8 tasks; all on a GPU)",
        flag="--task-chunk",
    )
    precision: str = option(
        "fp32", "bf16: forward passes under bfloat16 autocast", flag="--precision", choices=PRECISIONS
    )
    threads: int = option(
        0,
        "torch threads per process (0: automatic - 1 for sinusoid and for each Flower client, all cores for "
        "Omniglot in-process)",
        flag="--threads",
    )

    def __post_init__(self) -> None:
        _require(self.device in DEVICES, f"compute.device must be one of {DEVICES}, got {self.device!r}")
        _require(isinstance(self.batched, bool), f"compute.batched must be true or false, got {self.batched!r}")
        _require(
            isinstance(self.task_chunk, int) and not isinstance(self.task_chunk, bool) and self.task_chunk >= 0,
            f"compute.task_chunk must be a non-negative integer (0: automatic), got {self.task_chunk!r}",
        )
        _require(self.reply in REPLIES, f"compute.reply must be one of {REPLIES}, got {self.reply!r}")
        _require(self.precision in PRECISIONS, f"compute.precision must be one of {PRECISIONS}, got {self.precision!r}")
        _require(
            isinstance(self.workers, int) and not isinstance(self.workers, bool) and self.workers >= 0,
            f"compute.workers must be a non-negative integer (0: one node per client), got {self.workers!r}",
        )
        _require(
            isinstance(self.threads, int) and not isinstance(self.threads, bool) and self.threads >= 0,
            f"compute.threads must be a non-negative integer (0: automatic), got {self.threads!r}",
        )


# Flower's SecAgg+ masks vectors modulo 2**32; the sum of a round's quantised updates must stay below it.
SECAGG_MODULUS = 2**32


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation of the updates with Flower's SecAgg+ (Bell et al. 2020, arXiv:2005.00304).

    Clients mask their quantised updates so that the server learns only their sum. Runs over Flower (Ray
    simulation or a deployment); the in-process loop has no server to hide from and refuses it.
    """

    enabled: bool = option(
        False,
        "secure aggregation with Flower's SecAgg+: the server sees only the sum (ray engine / deployment)",
        flag="--secagg",
    )
    num_shares: float = option(1.0, "each client shares its keys with this fraction of the round's clients")
    reconstruction_threshold: float = option(0.5, "fraction of those shares needed to unmask")
    clipping_range: float = option(
        8.0, "SecAgg+: each coordinate is clipped to [-R, R]", flag="--secagg-clipping-range"
    )
    quantization_range: int = option(2**22, "SecAgg+: quantisation levels over [-R, R]")

    def __post_init__(self) -> None:
        _require(isinstance(self.enabled, bool), f"secagg.enabled must be true or false, got {self.enabled!r}")
        for name in ("num_shares", "reconstruction_threshold"):
            value = getattr(self, name)
            _require(
                isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1,
                f"secagg.{name} must be a fraction in (0, 1], got {value!r}",
            )
        _positive_float("secagg.clipping_range", self.clipping_range)
        _positive_int("secagg.quantization_range", self.quantization_range)
        _require(
            self.quantization_range < SECAGG_MODULUS // 2,
            f"secagg.quantization_range must be below 2**31, got {self.quantization_range}",
        )

    def max_clients(self) -> int:
        """The most clients per round whose quantised sum cannot wrap around the modulus."""
        return (SECAGG_MODULUS - 1) // self.quantization_range


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; saved beside every checkpoint so a run can be evaluated or repeated.

    The defaults are the main command's run (`simulations/presets/sinusoid-reptile.toml` spells them out).
    """

    algorithm: str = option("reptile", "the meta-learning algorithm", flag="--algorithm")
    data: DataConfig = field(default_factory=DataConfig)
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    maml: MamlConfig = field(default_factory=MamlConfig)
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    perfedavg: PerFedAvgConfig = field(default_factory=PerFedAvgConfig)

    def __post_init__(self) -> None:
        # A baseline (fedavg) is a run of its own beside a meta-learning run (fedmeta.experiment.fedavg_config).
        _require(
            self.algorithm in ALGORITHM_NAMES or self.algorithm in BASELINE_NAMES,
            f"algorithm must be one of {sorted(ALGORITHM_NAMES)}, got {self.algorithm!r}",
        )
        if self.algorithm in EMBEDDING_ALGORITHMS:
            _require(
                self.data.dataset != "sinusoid",
                f"{self.algorithm} is a classification method; it cannot run on the sinusoid regression family",
            )
        if self.maml.enabled:
            _require(
                self.algorithm == "maml",
                f"the maml.* options (MAML++) apply to algorithm 'maml', not {self.algorithm!r}",
            )
        if self.data.dataset == "shakespeare":
            _require(
                self.episode.client_tasks,
                "shakespeare's tasks are a speaker's own text: set episode.client_tasks (--client-tasks)",
            )
        if self.episode.client_tasks:
            _require(
                self.data.dataset in CLIENT_TASK_DATASETS,
                f"episode.client_tasks needs a naturally partitioned dataset {CLIENT_TASK_DATASETS}, "
                f"not {self.data.dataset!r}",
            )
            _require(
                self.algorithm in CLIENT_TASK_ALGORITHMS or self.algorithm in BASELINE_NAMES,
                f"episode.client_tasks adapts a model over the global labels: one of {CLIENT_TASK_ALGORITHMS}, "
                f"not {self.algorithm!r}",
            )
        if self.perfedavg != PerFedAvgConfig():
            _require(
                self.algorithm in ("perfedavg", "perfedavg-hf"),
                f"perfedavg.local_lr applies to algorithms 'perfedavg' and 'perfedavg-hf', not {self.algorithm!r}",
            )
        if self.matching.enabled:
            _require(
                self.algorithm == "matching",
                f"matching.fce and matching.scale apply to algorithm 'matching', not {self.algorithm!r}",
            )
        if self.episode.training_ways != self.episode.ways:
            _require(
                self.algorithm in EMBEDDING_ALGORITHMS and not self.episode.client_tasks,
                f"episode.train_ways {self.episode.train_ways} differs from episode.ways {self.episode.ways}: only "
                f"the metric methods {EMBEDDING_ALGORITHMS} compare any number of classes; {self.algorithm}'s "
                "head has a fixed number of outputs",
            )
        if self.episode.joint_embedding:
            _require(
                self.algorithm in EMBEDDING_ALGORITHMS,
                f"episode.joint_embedding applies to the metric methods {EMBEDDING_ALGORITHMS}, not {self.algorithm}",
            )
        if self.episode.augment:
            _require(
                self.data.dataset in ("omniglot", "femnist"),
                f"episode.augment distorts images: it applies to omniglot and femnist, not {self.data.dataset!r}",
            )
        if self.episode.training_queries == 0:
            _require(
                self.algorithm == "reptile",
                f"episode.train_queries 0 leaves {self.algorithm} no query set to learn from (only reptile pools)",
            )
        if self.inner.inner_optimizer == "adam":
            # A second-order meta-gradient differentiates Adam's sqrt(v), whose derivative is infinite where a
            # gradient is zero (e.g. a convolution bias before batch norm): NaN. First-order methods are fine.
            _require(
                self.algorithm in ("reptile", "fomaml"),
                f"inner.inner_optimizer 'adam' is for first-order methods (reptile, fomaml); {self.algorithm} "
                "differentiates through the inner loop, and through Adam's square root that is undefined",
            )
        if self.inner.adam_state == "carried":
            # The carried state is a running mean: the server's step must be a plain interpolation towards the
            # clients' states (an Adam outer step would rescale it into nonsense).
            _require(
                self.algorithm == "reptile" and self.inner.inner_optimizer == "adam" and self.outer.optimizer == "sgd",
                "inner.adam_state 'carried' needs algorithm reptile, inner.inner_optimizer adam and "
                f"outer.optimizer sgd (got {self.algorithm}, {self.inner.inner_optimizer}, {self.outer.optimizer})",
            )
        if self.robust.aggregator != "mean":
            # DP's sensitivity analysis is for the clipped mean; under SecAgg+ the server sees only the sum.
            _require(
                not self.privacy.enabled and not self.secagg.enabled,
                f"robust.aggregator {self.robust.aggregator!r} needs individual updates in the clear: "
                "it cannot be combined with privacy or secagg",
            )
        if self.compute.reply == "sum":
            # A sum hides the individual updates that these need.
            for needed, reason in (
                (self.compute.cohorts, "cohorts (it is the cohort that sums): drop --client-loop"),
                (self.robust.aggregator == "mean", f"the mean aggregator, not {self.robust.aggregator!r}"),
                (not self.privacy.adaptive_clipping, "a fixed clip norm: adaptive clipping counts each client's bit"),
            ):
                _require(needed, f"compute.reply 'sum' needs {reason}")
        if self.secagg.enabled:
            # SecAgg+ hides each node's message: one client's update, or one cohort worker's sum (not its rows).
            _require(
                self.compute.workers == 0 or self.compute.reply == "sum",
                "secagg masks one update per node; with compute.workers each node sends many clients' updates - "
                "use --workers 0 (one node per client), or --cohort-reply sum (each worker masks its cohort's sum)",
            )
            # Adaptive clipping needs each client's "was I clipped" bit; under SecAgg+ the server never sees it.
            _require(
                not self.privacy.adaptive_clipping,
                "privacy.adaptive_clipping cannot be combined with secagg (the server sees only the sum)",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Build from nested dicts (a checkpoint or a TOML preset); unknown keys are an error."""
        sections = {
            "data": DataConfig,
            "episode": EpisodeConfig,
            "inner": InnerConfig,
            "outer": OuterConfig,
            "federation": FederationConfig,
            "eval": EvalConfig,
            "privacy": PrivacyConfig,
            "secagg": SecAggConfig,
            "robust": RobustConfig,
            "compute": ComputeConfig,
            "maml": MamlConfig,
            "matching": MatchingConfig,
            "perfedavg": PerFedAvgConfig,
        }
        unknown = set(raw) - set(sections) - {"algorithm"}
        _require(not unknown, f"unknown config section(s): {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        if "algorithm" in raw:
            kwargs["algorithm"] = raw["algorithm"]
        for name, section_cls in sections.items():
            values = raw.get(name, {})
            known = {f.name for f in dataclasses.fields(section_cls)}
            bad = set(values) - known
            _require(not bad, f"unknown key(s) in [{name}]: {sorted(bad)}; known: {sorted(known)}")
            kwargs[name] = section_cls(**values)
        return cls(**kwargs)

    def to_flat(self) -> dict[str, int | float | str | bool]:
        """Dotted keys to scalars (`{"inner.inner_lr": 0.02, ...}`), `None` values left out.

        This is how a config travels in Flower's run config and ConfigRecords, which hold only scalars.
        """
        flat: dict[str, int | float | str | bool] = {"algorithm": self.algorithm}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                flat.update({f"{section}.{k}": v for k, v in values.items() if v is not None})
        return flat

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> RunConfig:
        """Inverse of `to_flat`; keys left out keep their defaults, unknown keys are an error.

        An empty string leaves an optional key unset (Flower's run config, being TOML, has no null).
        """
        defaults = cls().to_dict()

        def unset(dotted: str) -> bool:
            section, _, key = dotted.rpartition(".")
            return section in defaults and defaults[section].get(key, "") is None

        return cls().replace(**{k: None if v == "" and unset(k) else v for k, v in flat.items()})

    def replace(self, **overrides: Any) -> RunConfig:
        """Return a copy with dotted overrides applied, e.g. `{"inner.inner_lr": 0.1}`."""
        raw = self.to_dict()
        for dotted, value in overrides.items():
            section, _, key = dotted.rpartition(".")
            target = raw[section] if section else raw
            _require(key in target, f"unknown config key {dotted!r}")
            target[key] = value
        return RunConfig.from_dict(raw)
