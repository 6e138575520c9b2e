"""A `send` in a process of its own, to measure its peak memory alone:
``python -m benchmarks.sendproc ENV.json MANIFEST MODE`` prints the SendRun and the
process's peak RSS (``peak.vm_hwm``) as JSON."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from benchmarks.common import send_like_cli
from benchmarks.peak import vm_hwm


def main() -> None:
    env_file, manifest, mode = sys.argv[1:4]
    env = json.loads(Path(env_file).read_text())
    r = send_like_cli(env, Path(manifest), mode)
    print(json.dumps({**dataclasses.asdict(r), "peak_rss": vm_hwm()}))


if __name__ == "__main__":
    main()
