"""The gRPC protocols' messages, built from the .proto files beside this module.

The .proto files are compiled when the gRPC port is first opened, with grpcio-tools' protoc
into a FileDescriptorSet, then loaded into a descriptor pool of imagerec's own: no generated
code is kept in the source tree, and TF Serving's `tensorflow.*` messages cannot clash with
TensorFlow's (a process that runs the TensorFlow engine has those in the default pool). The
health and reflection services' files join the same pool, so server reflection describes every
service the port offers.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PROTO_DIR = Path(__file__).resolve().parent / "proto"
PROTO_FILES = ("kserve_v2.proto", "tensorflow_serving.proto")
KSERVE_SERVICE = "inference.GRPCInferenceService"
TFSERVING_SERVICE = "tensorflow.serving.PredictionService"


def compile_protos(files: tuple[str, ...] = PROTO_FILES) -> descriptor_pb2.FileDescriptorSet:
    """`files` and everything they import, compiled by protoc into one descriptor set.

    protoc runs in a child process: grpcio-tools links a libprotobuf of its own, and running it
    in a process that has loaded TensorFlow's crashes that process."""
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "protos.binpb"
        command = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{well_known}",
            "--include_imports",
            f"--descriptor_set_out={out}",
            *files,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"protoc could not compile {', '.join(files)}: {done.stderr}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _add_generated(pool: descriptor_pool.DescriptorPool, file_descriptor) -> None:
    """Add a generated module's file (and its imports) to `pool`, once."""
    for dependency in file_descriptor.dependencies:
        _add_generated(pool, dependency)
    try:
        pool.FindFileByName(file_descriptor.name)
    except KeyError:
        proto = descriptor_pb2.FileDescriptorProto()
        file_descriptor.CopyToProto(proto)
        pool.Add(proto)


@functools.cache
def protocol_pool() -> descriptor_pool.DescriptorPool:
    """imagerec's descriptor pool: both protocols, the health and the reflection services."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    pool = descriptor_pool.DescriptorPool()
    for module in (health_pb2, reflection_pb2):
        _add_generated(pool, module.DESCRIPTOR)
    for proto in compile_protos().file:
        try:
            pool.FindFileByName(proto.name)  # a well-known type the generated files brought
        except KeyError:
            pool.Add(proto)
    return pool


@functools.cache
def messages(package: str) -> SimpleNamespace:
    """The message classes of `package` ("inference", "tensorflow.serving", "tensorflow") by
    their short names, nested ones as Outer.Inner attributes of their class."""
    pool = protocol_pool()
    found = {}
    for name in PROTO_FILES + ("tensorflow_core.proto",):
        file = pool.FindFileByName(name)
        if file.package != package:
            continue
        for short, descriptor in file.message_types_by_name.items():
            found[short] = message_factory.GetMessageClass(descriptor)
        for short, enum in file.enum_types_by_name.items():
            found[short] = SimpleNamespace(**{v.name: v.number for v in enum.values})
    if not found:
        raise KeyError(f"no messages of package {package!r}")
    return SimpleNamespace(**found)
