#!/usr/bin/env python3
"""A reference TUF client for Tern's tests: python-tuf's ngclient refreshes
from a directory written by `tern registry export-tuf` and downloads one
target, verified. Test material only, never in the product's path.

    tuf-client.py REPO_DIR CLIENT_DIR TARGET_PATH OUT_FILE

CLIENT_DIR keeps the client's trusted metadata between runs (as a device
would), bootstrapped from REPO_DIR/1.root.json on the first run. Exit
status 0 on success; otherwise the python-tuf error is printed.
"""

import os
import shutil
import sys

from tuf.api import exceptions
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

BASE = "file:///repo/"


class DirFetcher(FetcherInterface):
    """Serves the exported directory as if it were a web server."""

    def __init__(self, root):
        self.root = root

    def _fetch(self, url):
        path = os.path.join(self.root, url[len(BASE):])
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise exceptions.DownloadHTTPError(f"{url} not found", 404)
        return iter([data])


def main():
    repo, client, target, out = sys.argv[1:5]
    os.makedirs(client, exist_ok=True)
    bootstrap = None
    if not os.path.exists(os.path.join(client, "root.json")):
        with open(os.path.join(repo, "1.root.json"), "rb") as f:
            bootstrap = f.read()
    targets_dir = os.path.join(client, "targets")
    os.makedirs(targets_dir, exist_ok=True)
    updater = Updater(
        metadata_dir=client,
        metadata_base_url=BASE,
        target_dir=targets_dir,
        target_base_url=BASE + "targets/",
        fetcher=DirFetcher(repo),
        bootstrap=bootstrap,
    )
    try:
        updater.refresh()
        info = updater.get_targetinfo(target)
        if info is None:
            print(f"no target {target}", file=sys.stderr)
            return 2
        path = updater.download_target(info)
    except (exceptions.RepositoryError, exceptions.DownloadError) as e:
        print(f"refused: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    shutil.copyfile(path, out)
    print(f"ok root={updater._trusted_set.root.version} timestamp={updater._trusted_set.timestamp.version} "
          f"length={info.length} custom={info.custom}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
