"""The mirror tests' real parts: moto's S3 server and its fault proxy (tests/s3)."""

from tests.s3.conftest import bucket, faulty, make_storage, moto_server, proxy  # noqa: F401
