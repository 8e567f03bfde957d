"""Stands in for ``festina_hpc.profiles.torch_worker`` in tests: speaks its protocol, runs nothing.

It appends what it saw (pid, SM share and GPU environment, request) as one
JSON line per request to the file named by ``FAKE_WORKER_LOG``. A prepare of
batch 999 answers an error; batch 666 crashes the worker.
"""

from __future__ import annotations

import json
import os
import sys


def log(request: dict[str, object]) -> None:
    entry = {"pid": os.getpid(), "sm": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
             "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "pipe": os.environ.get("CUDA_MPS_PIPE_DIRECTORY"),
             **request}
    with open(os.environ["FAKE_WORKER_LOG"], "a", encoding="utf-8") as out:
        out.write(json.dumps(entry) + "\n")


def reply(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def main() -> int:
    reply(ok=True, device="fake GPU")
    for line in sys.stdin:
        request = json.loads(line)
        log(request)
        if request["op"] == "prepare" and request["batch"] == 666:
            sys.stderr.write("warming up\nboom: the worker crashed\n")
            return 3
        if request["op"] == "prepare" and request["batch"] == 999:
            reply(ok=False, error="the workload does not fit in GPU memory")
        elif request["op"] == "prepare":
            reply(ok=True)
        else:
            reply(ok=True, steps=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
