"""The messages between the Flower ServerApp and ClientApp: record names here, the encoding in `wire.records`.

Shared by `server/` and `client/` and owned by neither; `fedmeta/` never imports it (nor Flower).

train request:    PARAMS (ArrayRecord), CONFIG (ConfigRecord: the flat RunConfig + ROUND)
train reply:      DIRECTION (ArrayRecord), METRICS (MetricRecord: task metrics + NUM_TASKS), CLIENT (ConfigRecord)
evaluate request: PARAMS, BASELINE_PREFIX + name for each baseline model, CONFIG, PROTOCOL (the tasks and steps)
evaluate reply:   METRICS with "<model>.k<step>" -> list of per-task values, CLIENT
query request:    CONFIG;  query reply: CLIENT (ROLE, INDEX, CLIENT_ID, NUM_TRAIN, NUM_PARTITIONS, NUM_GLOBAL_OUTPUTS)
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
NUM_PARTITIONS = "num-partitions"
NUM_GLOBAL_OUTPUTS = "num-global-outputs"

ROLE_TRAIN = "train"
ROLE_UNSEEN = "unseen"


def curve_key(model: str, step: int) -> str:
    return f"{model}.k{step}"
