import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from llmesh.mesh.default_model import make_tiny
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from llmesh.services.executor.weights import load_model
    return load_model(tiny_model_dir)


@pytest.fixture(scope="session", autouse=True)
def _meshes_down_at_the_end():
    """The last module's mesh goes down in the background too: wait for it and check it."""
    yield
    import mesh_downs
    mesh_downs.finish()


@pytest.fixture(scope="module", autouse=True)
def _previous_mesh_down(request):
    """A module whose first test brings up no `mesh` (a module fixture that waits for
    the previous module's mesh after its own is up) first waits for that mesh to be
    down and checked, so its tests never run beside a mesh stopping."""
    first = next((item for item in request.session.items
                  if getattr(item, "module", None) is request.module), None)
    if first is None or "mesh" not in first.fixturenames:
        import mesh_downs
        mesh_downs.finish()
