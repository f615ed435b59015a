"""Object storage: `s3://bucket/prefix` through fsspec and s3fs, its URLs, reads, uploads and errors.

The endpoint and region come from the standard AWS variables (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL,
AWS_REGION or AWS_DEFAULT_REGION: this module is Shoal's only reader of AWS_*); credentials come from
botocore's own chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE, the
shared files, an instance role). `data.storage_options` is passed to fsspec on top of them. Timeouts and
retries are short by default, so a wrong bucket, endpoint or key fails in seconds, as one line naming
the URL, instead of after s3fs's and botocore's retries.

s3fs is an optional extra (`shoal[s3]`) imported only when an s3:// URL is used; a Store pickles without
its filesystem, so every process (a rank, a loader worker) opens its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shoal.errors import DataError, ShoalError

SCHEME = "s3://"
INSTALL = "pip install 'shoal[s3]'"
# fail fast: botocore's defaults (60 s reads, s3fs's 5 retries with back-off) make a typo a minute's wait
DEFAULT_CONFIG = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}
S3FS_RETRIES = 2
CREDENTIALS = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment"


def is_remote(path: str | os.PathLike[str] | None) -> bool:
    """An object-storage URL Shoal reads by ranged requests (s3://), not a file path or a streamed URL."""
    return isinstance(path, str) and path.startswith(SCHEME)


def join(url: str, name: str) -> str:
    """url/name: a key under a prefix."""
    return f"{url.rstrip('/')}/{name}"


def bucket_of(url: str) -> str:
    return url[len(SCHEME) :].split("/", 1)[0]


def endpoint(options: Mapping[str, Any] | None = None) -> str:
    """Where requests go, for messages: storage_options' endpoint_url, the environment's, or AWS."""
    options = options or {}
    given = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
    return str(given or _env_endpoint() or "AWS S3")


def _env_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def fs_options(options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """s3fs's keyword arguments: the environment's endpoint and region, short timeouts, then `options` over
    them (a mapping such as client_kwargs or config_kwargs merged key by key, not replaced)."""
    # no listings cache: a long-lived rank or driver must see objects another process wrote since
    base: dict[str, Any] = {"config_kwargs": dict(DEFAULT_CONFIG), "use_listings_cache": False}
    if _env_endpoint():
        base["endpoint_url"] = _env_endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        base["client_kwargs"] = {"region_name": region}
    for key, value in (options or {}).items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def filesystem(options: Mapping[str, Any] | None = None) -> Any:
    """This process's s3fs filesystem for these options (fsspec caches one per options and process)."""
    try:
        import fsspec  # an optional extra: only a job that names s3:// needs it
        import s3fs  # noqa: F401  (fsspec finds s3 through it; imported here for the message when it is missing)
    except ImportError:
        raise ShoalError(f"s3:// paths need s3fs: {INSTALL}") from None
    try:
        fs = fsspec.filesystem("s3", **fs_options(options))
    except (TypeError, ValueError) as e:
        raise ShoalError(f"data.storage_options: not accepted by s3fs ({e})") from None
    fs.retries = S3FS_RETRIES
    return fs


class Store:
    """Reads and writes of one set of storage options, each failure a one-line DataError naming the URL."""

    def __init__(self, options: Mapping[str, Any] | None = None):
        self.options = dict(options or {})
        self._fs: Any = None
        self._pid = 0

    def __getstate__(self) -> dict[str, Any]:
        """Without the filesystem: it holds an event loop and sockets, and each process opens its own."""
        return {"options": self.options, "_fs": None, "_pid": 0}

    @property
    def fs(self) -> Any:
        # a forked loader worker inherits the parent's filesystem, whose event loop thread did not come along
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._pid = filesystem(self.options), os.getpid()
        return self._fs

    def read(self, url: str, start: int | None = None, end: int | None = None) -> bytes:
        """The object, or bytes [start, end) of it in one ranged GET."""
        with self.errors(url):
            return self.fs.cat_file(url, start=start, end=end)

    def exists(self, url: str) -> bool:
        """Whether the object exists; a missing bucket, a refused key or an unreachable endpoint raise."""
        with self.errors(url):
            try:
                self.fs.info(url)
            except FileNotFoundError as e:
                if _code(e) == "NoSuchBucket":
                    raise
                return False
        return True

    def names(self, prefix: str) -> set[str]:
        """The object names directly under a prefix (one listing, not a request per object)."""
        with self.errors(prefix):
            try:
                listed = self.fs.ls(prefix, detail=False, refresh=True)
            except FileNotFoundError as e:
                if _code(e) == "NoSuchBucket":
                    raise
                return set()
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in listed}

    def open(self, url: str, block_size: int) -> Any:
        """A seekable file that reads ahead `block_size` bytes per request (tar header scans)."""
        with self.errors(url):
            return self.fs.open(url, "rb", block_size=block_size, cache_type="readahead")

    def upload(self, local: Path, url: str) -> None:
        with self.errors(url):
            self.fs.put_file(str(local), url)

    def remove(self, urls: list[str]) -> None:
        if urls:
            with self.errors(urls[0]):
                self.fs.rm(urls)

    def check_bucket(self, url: str) -> None:
        """The bucket exists and these credentials may list it: before a long conversion writes there."""
        self.names(url)

    @contextmanager
    def errors(self, url: str) -> Iterator[None]:
        """s3fs's and botocore's exceptions as one line naming the URL and what to check."""
        try:
            yield
        except ShoalError:
            raise
        except Exception as e:
            message = _message(e, url, self.options)
            if message is None:
                raise
            raise DataError(message) from None


def _code(e: BaseException) -> str | None:
    """The S3 error code behind an s3fs exception (NoSuchBucket, AccessDenied, ...)."""
    for err in (e, e.__cause__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            return response.get("Error", {}).get("Code")
    return None


def _message(e: Exception, url: str, options: Mapping[str, Any]) -> str | None:
    """The line a user sees for a failed request (None: not a storage error, let it through)."""
    import botocore.exceptions as be  # s3fs is installed when a request could fail

    where = endpoint(options)
    if isinstance(e, OSError) and e.filename:  # a local file (an upload's source), not a request
        return f"{e.filename}: {e.strerror or e}"
    if isinstance(e, be.NoCredentialsError | be.PartialCredentialsError):
        return f"{url}: no S3 credentials found ({e}): {CREDENTIALS}"
    if isinstance(e, be.EndpointConnectionError | be.ConnectTimeoutError):
        return f"{url}: cannot reach the S3 endpoint {where} ({e}); set AWS_ENDPOINT_URL for a server other than AWS"
    if isinstance(e, FileNotFoundError):
        if _code(e) == "NoSuchBucket":
            return f"{url}: bucket {bucket_of(url)!r} does not exist at {where}"
        return f"{url}: not found"
    if isinstance(e, PermissionError):
        return f"{url}: access refused by {where} ({e}); check the credentials: {CREDENTIALS}"
    if isinstance(e, OSError | be.BotoCoreError):
        return f"{url}: S3 request failed at {where}: {type(e).__name__}: {e}"
    return None


# ---------------------------------------------------------------- `shoal shard ... s3://bucket/prefix`


def prepare_prefix(store: Store, url: str, manifest: str, overwrite: bool) -> set[str]:
    """Before a conversion writes to url: the bucket answers to these credentials, and a prefix that holds
    shards (a manifest) is only replaced with --overwrite, its old manifest removed first (a conversion
    that fails midway must not leave it naming half-replaced shards). Returns the names there now."""
    names = store.names(url)
    if manifest in names and not overwrite:
        raise DataError(f"{url}: already holds shards ({manifest}); pass --overwrite to replace them")
    if manifest in names:
        store.remove([join(url, manifest)])
    return names


def publish(store: Store, staging: Path, url: str, shards: list[str], manifest: str, stale: set[str]) -> None:
    """Upload the finished shards from the staging directory, then the manifest (a prefix without one was not
    finished), then remove the `stale` objects of an earlier conversion the new manifest does not list."""
    if shards:
        with store.errors(url):
            store.fs.put([str(staging / n) for n in shards], [join(url, n) for n in shards])
    store.upload(staging / manifest, join(url, manifest))
    store.remove([join(url, n) for n in sorted(stale - set(shards) - {manifest})])
