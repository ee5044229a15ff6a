import pytest

from chaos.load import make_workload


@pytest.fixture(scope="module")
def workload(tiny_model):
    return make_workload(tiny_model)
