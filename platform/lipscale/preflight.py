"""Before a study starts: that its root, its Optuna and MLflow stores and its data
answer, and that the data fits the model, creating none of them (a mistyped
host must not leave an empty study behind). Raises SpecError naming the field,
its URL redacted.

The spec's own checks (lipscale.spec) need no resource; these reach out: an
S3 listing, a database connection, the tracking server's health and login, the
dataset's manifest.
"""

import os
import urllib.error
import urllib.request

from lipscale import design, uris
from lipscale.data.catalog import GENERATED, convert_command
from lipscale.spec import Spec, SpecError


def check_storage(spec: Spec) -> None:
    """That the study root, the Optuna and MLflow stores and the data can be reached, without
    creating any of them; raises SpecError naming the field."""
    for field, check, location in (
        ("storage.root", _check_location, spec.root),
        ("storage.optuna", _check_url, spec.optuna_url),
        ("storage.mlflow", _check_url, spec.mlflow_uri),
    ):
        if problem := check(location):
            raise SpecError(uris.redact(f"{field}: {problem}"))
    for field, problem in _check_data(spec):
        raise SpecError(uris.redact(f"{field}: {problem}"))


def _check_location(location: str) -> str | None:
    """A root (or a store's file) on S3 or on this machine: there, or creatable."""
    if (bucket := uris.bucket(location)) is not None:
        import s3fs

        try:
            # Not exists(): it answers False for an endpoint that does not answer at all.
            s3fs.S3FileSystem().ls(bucket)
        except FileNotFoundError:
            return f"bucket {bucket!r} does not exist"
        except Exception as e:  # s3fs raises many kinds, all meaning "cannot reach it"
            return f"cannot reach {location}: {e}"
        return None
    path = uris.local_path(location)
    if path.exists():
        return None if os.access(path, os.W_OK) else f"{path} is not writable"
    while not path.exists():
        path = path.parent
    if not path.is_dir() or not os.access(path, os.W_OK):
        return f"{location} cannot be created: {path} is not a writable directory"
    return None


def _check_url(url: str) -> str | None:
    scheme = uris.scheme(url)
    if scheme == "sqlite":
        path = uris.sqlite_path(url)
        return None if path is None else _check_location(str(path))  # in memory: nothing to reach
    if scheme == "file":
        return _check_location(str(uris.file_store_path(url)))
    if scheme in ("http", "https"):
        try:
            urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=5)
        except urllib.error.HTTPError:
            pass  # it answered
        except OSError as e:
            return f"{url} does not answer: {e}"
        return _check_tracking_login(url)
    if scheme == "databricks":
        return None
    import sqlalchemy

    try:
        with sqlalchemy.create_engine(url).connect():
            return None
    except Exception as e:  # drivers raise their own kinds
        return f"cannot connect to {url}: {e}"


def _check_tracking_login(url: str) -> str | None:
    """That the tracking server lets this client read (with MLFLOW_TRACKING_USERNAME/PASSWORD
    where it authenticates): a refused login stops the study before its Optuna study exists."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(url).search_experiments(max_results=1)
    except MlflowException as e:
        return f"{url} refuses this client (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD?): {e.message[:300]}"
    return None


def _check_data(spec: Spec) -> list[tuple[str, str]]:
    """The data exists (unless the study generates it: digits or shapes without a uri), its
    images and classes fit the model, and an IsoFLOP design's budgets each take 3 sizes over
    its train split."""
    from lipnext.data import open_dataset
    from lipscale.data.convert import plan

    try:
        manifest = open_dataset(spec.data_uri).manifest
        shape, classes, train = tuple(manifest.shape), len(manifest.classes), manifest.count("train")
    except Exception as e:  # DataError, OSError, fsspec's ValueError for an unknown protocol, botocore's own
        if spec.dataset.uri is not None or spec.dataset.name not in GENERATED:  # named, so it must be there
            command = convert_command(spec.dataset.name, spec.data_uri)
            return [("dataset.uri", f"no converted dataset at {spec.data_uri}: {e}; convert it there: `{command}`")]
        generated = plan(spec.dataset.name, **spec.dataset.options)
        shape, classes, train = generated.shape, len(generated.classes), sum(p.count for p in generated.splits["train"])
    if problem := spec.base_model().data_mismatch(shape, classes):
        return [("fixed.model", f"{spec.dataset.name} {problem}")]
    try:
        design.points(spec, train)
    except ValueError as e:
        return [("design.budgets", str(e))]
    return []
