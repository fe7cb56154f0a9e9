"""The baseline of benchmarks/copyimage.py: Glance's own copy-image and store delete, driven by a bare script.

Run as a separate process, with only `requests`: for each image, POST /v2/images/ID/import (copy-image to the target
store), look at the image every 50 ms until the target store is listed and Glance's import lock is gone, then
DELETE /v2/stores/SOURCE/ID; N images at a time (threads). No discovery, no checks, no state, no verification
beyond what Glance does itself.
Usage: python _bare_copy_image.py GLANCE_URL SOURCE TARGET CONCURRENCY IMAGE_ID...   (token in env BENCH_TOKEN)
Prints one JSON line: {"seconds": ..., "images": ...}.
"""

import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

POLL = 0.05
local = threading.local()


def session():
    if not hasattr(local, "session"):
        local.session = requests.Session()
        local.session.headers["X-Auth-Token"] = os.environ["BENCH_TOKEN"]
    return local.session


def move(glance, source, target, image_id):
    s = session()
    resp = s.post(
        f"{glance}/v2/images/{image_id}/import",
        json={"method": {"name": "copy-image"}, "stores": [target]},
        timeout=60,
    )
    if resp.status_code != 202:
        raise RuntimeError(f"{image_id}: import: HTTP {resp.status_code} {resp.text[:300]}")
    while True:
        image = s.get(f"{glance}/v2/images/{image_id}", timeout=60).json()
        if target in (image.get("stores") or "").split(",") and not image.get("os_glance_import_task"):
            break
        if target in (image.get("os_glance_failed_import") or "").split(","):
            raise RuntimeError(f"{image_id}: the copy failed")
        time.sleep(POLL)
    resp = s.delete(f"{glance}/v2/stores/{source}/{image_id}", timeout=60)
    if resp.status_code != 204:
        raise RuntimeError(f"{image_id}: store delete: HTTP {resp.status_code} {resp.text[:300]}")


def main():
    glance, source, target, concurrency, ids = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in pool.map(lambda i: move(glance, source, target, i), ids):
            pass
    print(json.dumps({"seconds": time.monotonic() - t0, "images": len(ids)}))


if __name__ == "__main__":
    main()
