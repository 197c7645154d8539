"""One real single-node SLURM for every test that needs it (starting one takes seconds, and two would compete
for the same two cores)."""

import pytest

from tests.e2e.slurm_cluster import SlurmCluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
