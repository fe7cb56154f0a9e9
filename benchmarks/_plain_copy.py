"""The baseline of benchmarks/bench.py: a plain streamed copy of one image into another store.

Run as a separate process (its peak RSS is measured apart from the benchmark's), with only `requests`:
GET /v2/images/ID/file streamed, PUT into a new image with X-Image-Meta-Store, 1 MiB chunks, no hashing.
Usage: python _plain_copy.py GLANCE_URL IMAGE_ID SIZE STORE   (token in env BENCH_TOKEN)
Prints one JSON line: {"copy_seconds": ..., "new_id": ...}.
"""

import json
import os
import sys
import time

import requests

CHUNK = 1 << 20


class Stream:
    """A file-like view of a download with a length (so the PUT has a Content-Length); short reads."""

    def __init__(self, chunks, size):
        self.chunks, self.size, self.buf, self.pos = chunks, size, b"", 0

    def __len__(self):
        return self.size

    def read(self, n=-1):
        if self.pos >= len(self.buf):
            self.buf, self.pos = next(self.chunks, b""), 0
        end = len(self.buf) if n < 0 else self.pos + n
        out = self.buf[self.pos : end]
        self.pos += len(out)
        return out


def main():
    glance, image_id, size, store = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
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
            data=Stream(src.iter_content(CHUNK), size),
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
