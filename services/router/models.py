"""The models one router serves, by name (mesh.yaml's top-level model and its
`models:`): each has its own request core (`Generation`: its tokenizer, its
replicas, its dispatcher); they share the router's admission (tenants, limits,
quotas) and dead letters. A request names its model (`model`; empty = the
first, the top-level one); an unknown name is NOT_FOUND (HTTP 404) naming the
served ones. Free of grpc: the gRPC servicer and the HTTP API both look the
model up here.
"""
from __future__ import annotations

from llmesh.v1 import inference_pb2
from llmesh.services.common.errors import NotFoundError
from llmesh.services.router.generation import Generation


class Models:
    def __init__(self, generations: list[Generation]):
        assert generations, "a router serves at least one model"
        self.default = generations[0]
        self.by_name = {g.model_name: g for g in generations}
        assert len(self.by_name) == len(generations), "model names must differ"

    @property
    def names(self) -> list[str]:
        return list(self.by_name)

    def get(self, name: str) -> Generation:
        """The request core of model `name` ("" = the default model)."""
        if not name:
            return self.default
        generation = self.by_name.get(name)
        if generation is None:
            raise NotFoundError(f"model: {name!r} is not served here (served: "
                                f"{', '.join(self.by_name)})")
        return generation

    @property
    def is_ready(self) -> bool:
        """True while some model has a replica that takes requests (the router's
        health: it can serve something)."""
        return any(g.is_ready for g in self.by_name.values())

    def list_models(self) -> inference_pb2.ListModelsResponse:
        """Every model with a replica that has reported its shape."""
        out = inference_pb2.ListModelsResponse()
        for g in self.by_name.values():
            out.models.extend(g.list_models().models)
        return out
