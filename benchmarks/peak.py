"""Peak memory of a process, measured from inside it.

``ru_maxrss`` of a child read from outside (``wait4``, ``RUSAGE_CHILDREN``) is useless here:
Linux carries the parent's high-water mark across fork and exec, so every child of a 100 MB
bench process "peaks" at 100 MB. ``VmHWM`` in /proc/self/status belongs to the process's own
address space, which exec makes new.

    python -m benchmarks.peak OUT_FILE module:function [ARG ...]

runs ``module.function()`` with ``sys.argv = [module, ARG ...]`` (a console entry point, e.g.
``disburser.cli:main``) and writes this process's VmHWM in bytes to OUT_FILE at exit.
"""

from __future__ import annotations

import atexit
import importlib
import sys
from pathlib import Path


def vm_hwm() -> int:
    """This process's peak resident set size in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    out, target, *args = sys.argv[1:]
    atexit.register(lambda: Path(out).write_text(str(vm_hwm())))
    module, _, func = target.partition(":")
    sys.argv = [module, *args]
    getattr(importlib.import_module(module), func)()


if __name__ == "__main__":
    main()
