"""The baseline of benchmarks/discovery.py: list every image of a Glance, as a bare script.

Run as a separate process, with only `requests`: GET /v2/images?visibility=all&os_hidden=false&limit=PAGE, following
Glance's `next` links, then the same with os_hidden=true (the two listings glance-migrator makes, os_hidden being an
equality filter). Nothing is kept but a count. No auth (token in env BENCH_TOKEN), no classification, no state.
Usage: python _bare_list.py GLANCE_URL PAGE
Prints one JSON line: {"seconds": ..., "images": ..., "requests": ...}.
"""

import json
import os
import sys
import time

import requests


def main():
    glance, page = sys.argv[1], int(sys.argv[2])
    session = requests.Session()
    session.headers["X-Auth-Token"] = os.environ["BENCH_TOKEN"]
    t0 = time.monotonic()
    images = calls = 0
    for hidden in ("false", "true"):
        path = f"/v2/images?visibility=all&os_hidden={hidden}&limit={page}"
        while path:
            resp = session.get(glance + path, timeout=120)
            resp.raise_for_status()
            body = resp.json()
            calls += 1
            images += len(body.get("images", []))
            path = body.get("next")
    print(json.dumps({"seconds": time.monotonic() - t0, "images": images, "requests": calls}))


if __name__ == "__main__":
    main()
