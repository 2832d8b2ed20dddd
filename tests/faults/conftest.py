import pytest

from proxy.migrate import upgrade
from tests.pg_cluster import Cluster


@pytest.fixture(scope="module")
def pg_cluster():
    cluster = Cluster()
    upgrade(cluster.url)
    yield cluster
    cluster.destroy()
