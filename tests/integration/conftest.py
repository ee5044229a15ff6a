"""Fixtures shared by the mesh test modules; each module defines its own `mesh`."""
import grpc
import pytest

from llmesh.v1 import inference_pb2_grpc


@pytest.fixture
def stub(mesh):
    """A client of the module's mesh, through Envoy."""
    with grpc.insecure_channel(mesh.endpoint) as ch:
        yield inference_pb2_grpc.InferenceStub(ch)
