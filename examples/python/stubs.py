"""tollgate's Python stubs, generated from the project's own protos.

``python stubs.py`` generates them (the setup step; scripts/test.sh runs it);
``load()`` generates them too when missing, then imports them. They go under
``generated/<hash of the protos>/``, so stubs from older protos are never
used, and a run that generates them concurrently with another cannot leave
half-written files: each writes its own temporary directory and renames it
into place, and the loser of the rename uses the winner's.
"""

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PROTOS = ["tollgate/v1/rate_limiter.proto", "tollgate/v1/usage_quota.proto"]


def _stub_dir() -> Path:
    digest = hashlib.sha256()
    for name in PROTOS:
        digest.update(name.encode())
        digest.update((PROTO_ROOT / name).read_bytes())
    return HERE / "generated" / digest.hexdigest()[:16]


def generate() -> Path:
    """Generates the stubs unless they are there already; returns their dir."""
    target = _stub_dir()
    if target.is_dir():
        return target
    # Imported here: a run whose stubs exist needs no grpc_tools.
    import grpc_tools
    from grpc_tools import protoc

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        status = protoc.main(
            [
                "protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={scratch}",
                f"--grpc_python_out={scratch}",
                *PROTOS,
            ]
        )
        if status != 0:
            raise RuntimeError(f"protoc failed ({status}) on {PROTO_ROOT}")
        try:
            os.rename(scratch, target)
        except OSError:
            if not target.is_dir():
                raise
            # Another run renamed its stubs into place first: use those.
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def load():
    """Imports the stubs: (rate_limiter_pb2, rate_limiter_pb2_grpc,
    usage_quota_pb2, usage_quota_pb2_grpc)."""
    sys.path.insert(0, str(generate()))
    from tollgate.v1 import (
        rate_limiter_pb2,
        rate_limiter_pb2_grpc,
        usage_quota_pb2,
        usage_quota_pb2_grpc,
    )

    return rate_limiter_pb2, rate_limiter_pb2_grpc, usage_quota_pb2, usage_quota_pb2_grpc


if __name__ == "__main__":
    print(generate())
