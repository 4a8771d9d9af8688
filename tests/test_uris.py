"""Store locations as a spec names them, parsed the one way lipscale.uris does."""

from pathlib import Path

import pytest

from lipscale import uris


@pytest.mark.parametrize(
    "location, protocol, local, bucket",
    [
        ("/data/runs/digits", None, Path("/data/runs/digits"), None),
        ("runs/digits", None, Path("runs/digits"), None),
        ("file:///data/runs/digits", "file", Path("/data/runs/digits"), None),
        ("s3://lipscale/studies/digits", "s3", None, "lipscale"),
        ("gs://lipscale/studies/digits", "gs", None, None),
    ],
)
def test_a_root_is_a_local_path_or_a_remote_location(location, protocol, local, bucket):
    assert (uris.protocol(location), uris.local_path(location), uris.bucket(location)) == (protocol, local, bucket)


def test_ray_hands_out_checkpoint_paths_without_their_protocol():
    assert uris.with_protocol("lipscale/study/tune/trial-0000/checkpoint_000001", like="s3://lipscale/study") == (
        "s3://lipscale/study/tune/trial-0000/checkpoint_000001"
    )
    local = "/runs/study/tune/trial-0000/checkpoint_000001"
    assert uris.with_protocol(local, like="/runs/study") == local


@pytest.mark.parametrize(
    "url, scheme, database",
    [
        ("sqlite:////runs/digits/optuna.db", "sqlite", Path("/runs/digits/optuna.db")),
        ("sqlite:///optuna.db", "sqlite", Path("optuna.db")),  # relative to the working directory
        ("sqlite://", "sqlite", None),  # in memory
        ("postgresql+psycopg://study:pw@db:5432/optuna", "postgresql", None),
        ("mysql://db/optuna", "mysql", None),
        ("https://mlflow.example.org", "https", None),
        ("databricks", "databricks", None),  # MLflow's name for the default profile's workspace
    ],
)
def test_a_store_url_has_a_scheme_and_maybe_a_local_database(url, scheme, database):
    assert (uris.scheme(url), uris.sqlite_path(url)) == (scheme, database)


def test_only_a_servers_tracking_uri_is_a_server():
    assert [uris.is_server(u) for u in ("http://h:5000", "https://h", "databricks", "sqlite:///m.db", "file:///m")] == [
        True, True, True, False, False,
    ]  # fmt: skip
    assert uris.file_store_path("file:///runs/mlruns") == Path("/runs/mlruns")


@pytest.mark.parametrize(
    "address, host, port",
    [("127.0.0.1:6379", "127.0.0.1", 6379), ("ray://head:10001", "head", 10001), ("head-node", "head-node", None),
     ("head:port", "head", None)],
)  # fmt: skip
def test_a_ray_address_is_host_and_port(address, host, port):
    assert uris.host_port(address) == (host, port)
