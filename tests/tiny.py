"""The command-line tests' common pieces: TINY, the smallest run of a script that still does everything once (CPU, 4
environments, 8 steps, 2 minibatches, 1 epoch, no periodic evaluation, 1 s episodes), and wait_for_line."""

import subprocess
import time

TINY = [
    "--device",
    "cpu",
    "--num-envs",
    "4",
    "--num-steps",
    "8",
    "--num-minibatches",
    "2",
    "--update-epochs",
    "1",
    "--eval-interval",
    "0",
    "--episode-length-s",
    "1.0",
]


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 240) -> str:
    """The process's stdout up to and including the first line that holds `text`; kills it and fails if none comes
    within `timeout` seconds or before its output ends."""
    t0, lines = time.time(), []
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return "".join(lines)
    proc.kill()
    raise AssertionError(f"no line with {text!r}:\n{''.join(lines)}\n{proc.stderr.read() if proc.stderr else ''}")
