"""What the two fuzz suites share: how many examples, and the routes of every protocol."""

import os

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("IMAGEREC_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=EXAMPLES <= 150,  # the suite's bounded run is the same every time
)
# Routes under these answer in their protocol's error shape ({"error": "..."}), the rest in
# the native one ({"error": {"code", "message"}}).
PROTOCOL_PREFIXES = ("/v2", "/v1/models/")
# Every route of every protocol, with {name} and {version} to fill in, and two that do not exist.
ROUTES = [
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/model"),
    ("GET", "/v1/model/card"),
    ("GET", "/v1/labels"),
    ("GET", "/v1/models"),
    ("POST", "/v1/predict"),
    ("GET", "/v2"),
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2/models/{name}"),
    ("GET", "/v2/models/{name}/ready"),
    ("GET", "/v2/models/{name}/versions/{version}"),
    ("GET", "/v2/models/{name}/versions/{version}/ready"),
    ("POST", "/v2/models/{name}/infer"),
    ("POST", "/v2/models/{name}/versions/{version}/infer"),
    ("POST", "/v2/repository/index"),
    ("POST", "/v2/repository/models/{name}/load"),
    ("POST", "/v2/repository/models/{name}/unload"),
    ("GET", "/v1/models/{name}"),
    ("GET", "/v1/models/{name}/metadata"),
    ("POST", "/v1/models/{name}:predict"),
    ("POST", "/v1/models/{name}:classify"),
    ("POST", "/v1/models/{name}:regress"),
    ("POST", "/v1/models/{name}/versions/{version}:predict"),
    ("POST", "/v1/models/{name}/versions/{version}:classify"),
    ("POST", "/v1/models/{name}/versions/{version}:regress"),
    ("GET", "/v1/models/{name}/versions/{version}"),
    ("GET", "/v1/models/{name}/versions/{version}/metadata"),
    ("GET", "/no/such/route"),
    ("DELETE", "/v1/predict"),
]
