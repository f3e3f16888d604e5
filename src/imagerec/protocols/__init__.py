"""Other wire protocols over the same model: Open Inference Protocol v2 (KServe, Triton, Seldon
MLServer, OpenVINO Model Server) and TensorFlow Serving's REST API."""

from imagerec.protocols.kserve_v2 import add_v2_repository_routes, add_v2_routes
from imagerec.protocols.tfserving import add_tfserving_routes

__all__ = ["add_tfserving_routes", "add_v2_repository_routes", "add_v2_routes"]
