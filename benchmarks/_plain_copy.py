"""The baseline of benchmarks/bench.py: a plain streamed copy of one image into another store.

Run as a separate process (its peak RSS is measured apart from the benchmark's), with only `requests`:
GET /v2/images/ID/file streamed, PUT into a new image with X-Image-Meta-Store, 1 MiB chunks, no hashing; with
--hash, each chunk is also hashed with md5 and sha512 on its way (what the tool must do to verify a copy).
Usage: python _plain_copy.py GLANCE_URL IMAGE_ID SIZE STORE [--hash]   (token in env BENCH_TOKEN)
Prints one JSON line: {"copy_seconds": ..., "new_id": ...}.
"""

import hashlib
import json
import os
import sys
import time

import requests

CHUNK = 1 << 20


class Stream:
    """A file-like view of a download with a length (so the PUT has a Content-Length); short reads."""

    def __init__(self, chunks, size, hashers):
        self.chunks, self.size, self.hashers = chunks, size, hashers

    def __len__(self):
        return self.size

    def __iter__(self):  # an iterable with a length: requests sends Content-Length and each chunk whole
        for chunk in self.chunks:
            for h in self.hashers:
                h.update(chunk)
            yield chunk


def main():
    glance, image_id, size, store = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    hashers = [hashlib.md5(usedforsecurity=False), hashlib.sha512()] if "--hash" in sys.argv[5:] else []
    session = requests.Session()
    session.headers["X-Auth-Token"] = os.environ["BENCH_TOKEN"]
    body = {"name": f"plain copy of {image_id}", "disk_format": "raw", "container_format": "bare"}
    new = session.post(f"{glance}/v2/images", json=body, timeout=60)
    new.raise_for_status()
    new_id = new.json()["id"]
    t0 = time.monotonic()
    with session.get(f"{glance}/v2/images/{image_id}/file", stream=True, timeout=(10, 300)) as src:
        src.raise_for_status()
        put = session.put(
            f"{glance}/v2/images/{new_id}/file",
            data=Stream(src.iter_content(CHUNK), size, hashers),
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(size),
                "X-Image-Meta-Store": store,
            },
            timeout=(10, 300),
        )
    elapsed = time.monotonic() - t0
    if put.status_code != 204:
        sys.exit(f"PUT: HTTP {put.status_code} {put.text[:300]}")
    print(json.dumps({"copy_seconds": elapsed, "new_id": new_id}))


if __name__ == "__main__":
    main()
