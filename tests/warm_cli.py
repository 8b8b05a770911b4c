"""Many `rayft` command lines from one warm process, for tests that run a command many times.

It imports the CLI and what its checks load (transformers' model code, peft, the methods, MLflow,
Ray) once, then forks a child for each command line. The child runs rayft's entry point as the
console script does (`rayft.cli.main`, sys.exit included), in its own working directory, with its
stdout and stderr going to its own files. Each command then costs its own work and not the ~5 s
of imports a fresh `rayft` process spends before it can refuse bad input.

    python tests/warm_cli.py JOBS.json   # [{"args": [...], "cwd": ..., "stdout": ..., "stderr": ...}]

Prints the exit codes as a JSON list, in the jobs' order. At most `--parallel` (2) children at once.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def _warm() -> None:
    import mlflow  # noqa: F401
    import peft  # noqa: F401
    import ray  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401
    from transformers.models.qwen2 import modeling_qwen2  # noqa: F401

    import rayft.cli  # noqa: F401
    import rayft.methods  # noqa: F401
    import rayft.train.runner  # noqa: F401


def _child(job: dict) -> None:
    code = 1
    try:
        os.chdir(job["cwd"])
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.argv = ["rayft", *job["args"]]
        from rayft.cli import main

        main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as an uncaught exception ends a process: its traceback, exit 1
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    jobs = json.loads(open(sys.argv[1]).read())
    parallel = int(sys.argv[sys.argv.index("--parallel") + 1]) if "--parallel" in sys.argv else 2
    _warm()
    codes: list = [None] * len(jobs)
    running: dict[int, int] = {}

    def reap() -> None:
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)

    for index, job in enumerate(jobs):
        while len(running) >= parallel:
            reap()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(job)
        running[pid] = index
    while running:
        reap()
    print(json.dumps(codes))


if __name__ == "__main__":
    main()
