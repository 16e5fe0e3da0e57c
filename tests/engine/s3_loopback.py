"""An S3-compatible server on 127.0.0.1 for the batch-job tests: moto's standalone server, started
in this process (a thread), with the AWS settings every S3 client here reads (`AWS_ENDPOINT_URL`,
dummy credentials) in the environment, so the job opens `s3://bucket/...` with nothing else set.
Subprocesses and Ray workers started after it inherit the environment."""

from __future__ import annotations

import logging
import os

import pytest

BUCKET = "instructrec-tests"


@pytest.fixture(scope="module")
def s3_loopback():
    """The bucket's URI prefix (`s3://instructrec-tests`) and a pyarrow S3FileSystem on it."""
    server_module = pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (dev extra)")
    import pyarrow.fs as pafs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    _, port = server.get_host_and_port()
    settings = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        filesystem = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                                       secret_key="testing", region="us-east-1", allow_bucket_creation=True)
        filesystem.create_dir(BUCKET)
        yield f"s3://{BUCKET}", filesystem
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


def s3_names(filesystem, prefix: str) -> list[str]:
    """Object names directly under `prefix` (bucket/key), sorted."""
    import pyarrow.fs as pafs

    infos = filesystem.get_file_info(pafs.FileSelector(prefix, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)
