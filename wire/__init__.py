"""The messages between the Flower ServerApp and ClientApp: record names here, the encoding in `wire.records`.

Shared by `server/` and `client/` and owned by neither; `fedmeta/` never imports it (nor Flower).

train request:    PARAMS (ArrayRecord), CONFIG (ConfigRecord: the flat RunConfig + ROUND [+ CLIENTS for a worker])
train reply:      DIRECTION (ArrayRecord), METRICS (MetricRecord: task metrics + NUM_TASKS), CLIENT (ConfigRecord);
                  a worker's: the same records with one row (a leading axis, or a list entry) per client, CLIENT
                  holding CLIENT_IDS; a worker's sum (compute.reply = "sum"): DIRECTION the float64 total,
                  METRICS the metric sums + NUM_TASKS, WEIGHT, COUNT, CLIPPED; CLIENT holding FIRST_ID and
                  REJECTED_IDS / REJECTED_REASONS
evaluate request: PARAMS, BASELINE_PREFIX + name for each baseline model, CONFIG [+ CLIENTS], PROTOCOL
evaluate reply:   METRICS with "<model>.k<step>" -> list of per-task values (a worker's: clients x tasks, in the
                  order of CLIENTS), CLIENT
query request:    CONFIG;  query reply: CLIENT (ROLE, INDEX, CLIENT_ID, NUM_TRAIN, NUM_UNSEEN, NUM_PARTITIONS,
                  NUM_GLOBAL_OUTPUTS)

A node is one client (ROLE_TRAIN / ROLE_UNSEEN, partition = client), or, with `compute.workers` = W, a cohort
worker (ROLE_WORKER, partition p of W) computing every client c with c mod W = p.
"""

PARAMS = "params"
CONFIG = "config"
DIRECTION = "direction"
METRICS = "metrics"
CLIENT = "client"
BASELINE_PREFIX = "baseline."
PROTOCOL = "protocol"

ROUND = "round"
NUM_TASKS = "num-tasks"
ROLE = "role"
INDEX = "index"
CLIENT_ID = "client-id"
NUM_TRAIN = "num-train"
NUM_UNSEEN = "num-unseen"
CLIENTS = "clients"
CLIENT_IDS = "client-ids"
WEIGHT = "weight"
COUNT = "count"
CLIPPED = "clipped"
FIRST_ID = "first-id"
REJECTED_IDS = "rejected-ids"
REJECTED_REASONS = "rejected-reasons"
NUM_PARTITIONS = "num-partitions"
NUM_GLOBAL_OUTPUTS = "num-global-outputs"

ROLE_TRAIN = "train"
ROLE_UNSEEN = "unseen"
ROLE_WORKER = "worker"


def curve_key(model: str, step: int) -> str:
    return f"{model}.k{step}"
