"""A team's backends: one PostgreSQL server and one S3-compatible bucket, declared here and only here.

The settings (environment variables; none of them is ever put on a command line):

- RMFLOW_DATABASE_URL  postgresql://USER:PASSWORD@HOST:PORT — a PostgreSQL *server*. rmflow creates
  one database per service on it (prefect, mlflow, labelstudio) when missing. USER needs CREATEDB,
  or create those three databases beforehand. A path in the URL is ignored.
- RMFLOW_STORAGE_URL   s3://BUCKET[/PREFIX] — where MLflow's artifacts, the pipeline's dataset versions
  (DATASETS) and Ray Train's default storage_path (RAY_RESULTS) live. The bucket is created when missing.
- AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY — the bucket's credentials (the standard variables boto3,
  MLflow and pyarrow read).
- MLFLOW_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL) — the S3 endpoint when it is not AWS (SeaweedFS,
  MinIO, Ceph…).

`rmflow up --team` with none of these set starts a local PostgreSQL (infra/postgres.py) and a local
SeaweedFS S3 server (infra/objectstore.py) under RMFLOW_HOME and uses them; with them set it starts
neither and uses what they name. Only the MLflow *server* needs the bucket's credentials: clients reach
artifacts through it (`--serve-artifacts`), so a consumer pulling models:/NAME@champion needs none.
"""
from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from rmflow.infra.process import ServiceError

SERVICE_DATABASES = ("prefect", "mlflow", "labelstudio")
# under the bucket's prefix: datasets/<project>/<version>/ and datasets/<project>/snapshots/ mirror
# RMFLOW_HOME/datasets/<project>/ (`rmflow migrate` copies that tree there); ray_results/ is Ray Train's
DATASETS, RAY_RESULTS = "datasets", "ray_results"


class TeamSettings(BaseSettings):
    """The team backends' settings, read from the environment (see the module docstring)."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    database_url: SecretStr | None = Field(None, validation_alias="RMFLOW_DATABASE_URL",
                                           description="postgresql://USER:PASSWORD@HOST:PORT of the team's PostgreSQL server.")
    storage_url: str | None = Field(None, validation_alias="RMFLOW_STORAGE_URL",
                                    description="s3://BUCKET[/PREFIX] for artifacts, dataset versions and checkpoints.")
    access_key_id: str | None = Field(None, validation_alias="AWS_ACCESS_KEY_ID")
    secret_access_key: SecretStr | None = Field(None, validation_alias="AWS_SECRET_ACCESS_KEY")
    endpoint_url: str | None = Field(None, validation_alias=AliasChoices("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"),
                                     description="The S3 endpoint when it is not AWS.")


def redact(url: str) -> str:
    """`url` with its password replaced by ***: what logs, errors and status may show."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class Database:
    """A PostgreSQL server rmflow's services keep their databases on."""

    host: str
    port: int
    user: str
    password: str
    local: bool  # started by rmflow (infra/postgres.py), not pointed at

    @classmethod
    def from_url(cls, url: str, local: bool = False) -> Database:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres", "postgresql+psycopg2") or not parts.hostname or not parts.username:
            raise ServiceError(f"RMFLOW_DATABASE_URL must look like postgresql://USER:PASSWORD@HOST:PORT, not {redact(url)}")
        return cls(parts.hostname, parts.port or 5432, urllib.parse.unquote(parts.username),
                   urllib.parse.unquote(parts.password or ""), local)

    @property
    def url(self) -> str:
        """The server's address without credentials (what status shows)."""
        return f"postgresql://{self.host}:{self.port}"

    def service_url(self, service: str, driver: str = "postgresql") -> str:
        """The SQLAlchemy URL of `service`'s own database, password included: for an environment
        variable or a file, never a command line or a log."""
        user, password = (urllib.parse.quote(v, safe="") for v in (self.user, self.password))
        return f"{driver}://{user}:{password}@{self.host}:{self.port}/{service}"

    def connect(self, dbname: str = "postgres", timeout_s: int = 5):
        import psycopg2

        try:
            return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password, dbname=dbname,
                                    connect_timeout=timeout_s)
        except psycopg2.OperationalError as e:
            what = "RMFLOW_DATABASE_URL" if not self.local else "rmflow's local PostgreSQL"
            raise ServiceError(f"PostgreSQL at {self.url} (user {self.user}, from {what}) refused the connection: "
                               f"{str(e).replace(self.password, '***').strip() if self.password else str(e).strip()}") from None

    def ensure_databases(self, names: tuple[str, ...] = SERVICE_DATABASES) -> None:
        """Creates each service's database when it does not exist yet (never drops or alters one)."""
        conn = self.connect()
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute("SELECT datname FROM pg_database")
                have = {row[0] for row in cur.fetchall()}
                for name in names:
                    if name not in have:
                        cur.execute(f'CREATE DATABASE "{name}"')  # names are ours (SERVICE_DATABASES), not input
        finally:
            conn.close()


@dataclass(frozen=True)
class Storage:
    """An S3 bucket (and key prefix) with the credentials and endpoint to reach it."""

    bucket: str
    prefix: str
    endpoint_url: str | None
    access_key_id: str | None
    secret_access_key: str | None
    local: bool

    @classmethod
    def from_url(cls, url: str, endpoint_url: str | None, key: str | None, secret: str | None, local: bool = False) -> Storage:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ServiceError(f"RMFLOW_STORAGE_URL must look like s3://BUCKET[/PREFIX], not {url}")
        return cls(parts.netloc, parts.path.strip("/"), endpoint_url, key, secret, local)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")

    def uri(self, *parts: str) -> str:
        """s3://bucket/prefix/part/… for a key under this store's prefix."""
        return "/".join([self.url, *(p.strip("/") for p in parts)])

    def env(self) -> dict[str, str]:
        """The standard variables boto3, MLflow and pyarrow read, for a process that needs the bucket."""
        out = {"AWS_ACCESS_KEY_ID": self.access_key_id, "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
               "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url, "AWS_ENDPOINT_URL": self.endpoint_url,
               "AWS_DEFAULT_REGION": "us-east-1"}
        return {k: v for k, v in out.items() if v}

    def client(self, timeout_s: float = 10, retries: int = 2):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key_id,
                            aws_secret_access_key=self.secret_access_key, region_name="us-east-1",
                            config=Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": retries},
                                          s3={"addressing_style": "path"}))

    def describe_error(self, e: Exception, doing: str) -> ServiceError:
        """A ServiceError naming the store, its endpoint and the variable to fix; never the secret."""
        from botocore.exceptions import ClientError, EndpointConnectionError

        where = f"the object store at {self.endpoint_url or 'AWS S3'} (bucket {self.bucket})"
        denied = ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "403", "Forbidden")
        # boto3's transfers wrap the service's answer in S3UploadFailedError: its code is only in the text
        wrapped = next((c for c in denied if f"({c})" in str(e)), None) if not isinstance(e, ClientError) else None
        if isinstance(e, ClientError) or wrapped:
            code = e.response.get("Error", {}).get("Code", "") if isinstance(e, ClientError) else wrapped
            if code in denied:
                return ServiceError(f"{where} rejected the credentials while {doing} ({code}): check AWS_ACCESS_KEY_ID "
                                    f"(now {self.access_key_id or 'unset'}) and AWS_SECRET_ACCESS_KEY")
            return ServiceError(f"{where} failed while {doing}: {code or e}")
        if isinstance(e, EndpointConnectionError) or isinstance(e, OSError) or "connect" in type(e).__name__.lower():
            return ServiceError(f"{where} does not answer while {doing} (is it running? MLFLOW_S3_ENDPOINT_URL / "
                                f"AWS_ENDPOINT_URL = {self.endpoint_url or 'unset'}): {e}")
        return ServiceError(f"{where} failed while {doing}: {type(e).__name__}: {e}")

    def key(self, *parts: str) -> str:
        """The object key of `parts` under this store's prefix."""
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))

    def upload_dir(self, local: Path, *parts: str) -> str:
        """Copies folder `local` to s3://bucket/prefix/parts/…, file by file, manifests last (a reader
        that finds a dataset version's manifest finds the whole version); returns that URI. A failure
        (the store down or gone mid-copy) raises a ServiceError naming the store; the copy can simply
        be run again (each object is written whole or not at all)."""
        s3 = self.client()
        for path in sorted((p for p in Path(local).rglob("*") if p.is_file()), key=lambda p: (p.name == "manifest.json", str(p))):
            self.upload_file(path, *parts, path.relative_to(local).as_posix(), client=s3)
        return self.uri(*parts)

    def upload_file(self, local: Path, *parts: str, client=None) -> str:
        """Copies file `local` to s3://bucket/prefix/parts…; returns that URI (errors as upload_dir's)."""
        key = self.key(*parts)
        try:
            (client or self.client()).upload_file(str(local), self.bucket, key)
        except Exception as e:  # noqa: BLE001 — one clear error naming the store
            raise self.describe_error(e, f"writing s3://{self.bucket}/{key}") from None
        return self.uri(*parts)

    def download_dir(self, *parts: str, dest: Path) -> Path:
        """Copies every object under s3://bucket/prefix/parts/ into `dest` (created); returns it."""
        s3 = self.client()
        prefix = self.key(*parts) + "/"
        found = 0
        try:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    target = Path(dest) / obj["Key"][len(prefix):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file(self.bucket, obj["Key"], str(target))
                    found += 1
        except Exception as e:  # noqa: BLE001
            raise self.describe_error(e, f"reading s3://{self.bucket}/{prefix}") from None
        if not found:
            raise ServiceError(f"nothing at s3://{self.bucket}/{prefix} in the object store at {self.endpoint_url or 'AWS S3'}")
        return Path(dest)

    def pyarrow_fs(self, own_keys: bool = True):
        """The bucket as a pyarrow filesystem (what Ray Train's storage_filesystem takes). Without
        `own_keys` it carries no credentials: each process that uses it, or unpickles it (Ray Train's
        controller and workers, on any node), reads AWS_* from its own environment, so the driver's
        keys never travel to the cluster. The endpoint does travel: it must be one every node reaches."""
        from pyarrow import fs

        endpoint = urllib.parse.urlsplit(self.endpoint_url) if self.endpoint_url else None
        keys = {"access_key": self.access_key_id, "secret_key": self.secret_access_key} if own_keys else {}
        return fs.S3FileSystem(**keys, region="us-east-1", endpoint_override=endpoint.netloc if endpoint else None,
                               scheme=endpoint.scheme if endpoint else "https")

    def ensure_bucket(self) -> None:
        """Creates the bucket when missing; checks that the credentials are accepted either way."""
        from botocore.exceptions import ClientError

        s3 = self.client()
        try:
            s3.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise self.describe_error(e, "checking the bucket") from None
        except Exception as e:  # noqa: BLE001 — connection errors: one clear line
            raise self.describe_error(e, "checking the bucket") from None
        try:
            s3.create_bucket(Bucket=self.bucket)
        except Exception as e:  # noqa: BLE001
            raise self.describe_error(e, "creating the bucket") from None


def settings() -> TeamSettings:
    return TeamSettings()


def team_storage() -> Storage | None:
    """The team's bucket when RMFLOW_STORAGE_URL names one (`rmflow up --team` gives it to the
    deployments it serves); None on an embedded install, which keeps everything under RMFLOW_HOME."""
    url = settings().storage_url
    return storage_for(url) if url else None


def is_bucket_uri(path: str | Path) -> bool:
    return str(path).startswith("s3://")


def storage_for(uri: str) -> Storage:
    """The store holding `uri` (s3://BUCKET/KEY…), reached with the endpoint and credentials the
    environment gives (AWS_*, MLFLOW_S3_ENDPOINT_URL / AWS_ENDPOINT_URL): on a Ray node, its own."""
    s = settings()
    return Storage.from_url(uri, s.endpoint_url, s.access_key_id, s.secret_access_key.get_secret_value() if s.secret_access_key else None)


def fetch_dataset(uri: str, dest: Path) -> Path:
    """A dataset version published in the bucket (`uri`), copied into `dest` (a worker's own temp
    folder): how a training worker on any node reads it, never through the driver's disk."""
    store = storage_for(uri)
    out = store.download_dir(dest=Path(dest))
    if not (out / "manifest.json").is_file():
        raise ServiceError(f"{uri} is not an rmflow dataset (no manifest.json in the bucket)")
    return out


def publish_dataset(local: Path, uri: str) -> str:
    """Copies dataset folder `local` (manifest, splits) to `uri` in the bucket; returns `uri`. The
    manifest goes last, so a reader that finds it finds the whole version; a version whose manifest
    is there already is not copied again (a version's name is its content's hash)."""
    local = Path(local)
    if not (local / "manifest.json").is_file():
        raise FileNotFoundError(f"{local} is not an rmflow dataset (no manifest.json)")
    store = storage_for(uri)
    if not object_exists(store, store.key("manifest.json")):
        store.upload_dir(local)
    return uri


def object_exists(store: Storage, key: str) -> bool:
    """Whether `key` is in the bucket; a ServiceError naming the store when it does not answer."""
    from botocore.exceptions import ClientError

    try:
        store.client().head_object(Bucket=store.bucket, Key=key)
        return True
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise store.describe_error(e, f"reading s3://{store.bucket}/{key}") from None
    except Exception as e:  # noqa: BLE001 — the store does not answer
        raise store.describe_error(e, f"reading s3://{store.bucket}/{key}") from None


def configured() -> bool:
    """Whether the team backends are asked for by the environment (RMFLOW_DATABASE_URL or RMFLOW_STORAGE_URL)."""
    s = settings()
    return bool(s.database_url or s.storage_url)
