import pytest

from chaos.load import make_workload


@pytest.fixture(scope="session")  # (the same seeded requests and answers for every module)
def workload(tiny_model):
    return make_workload(tiny_model)
