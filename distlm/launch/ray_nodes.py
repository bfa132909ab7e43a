"""Ray bootstrap helpers for the sbatch script (`python -m distlm.launch.ray_nodes ...`).

address                            this node's IP (as Ray detects it) and a free port: IP:PORT
port                               a free TCP port on this node
wait ADDRESS COUNT TIMEOUT [PID..] wait until COUNT Ray nodes are alive in the cluster at
                                   ADDRESS; fail at once if a PID (a node's srun step) exits
node -- CMD..                      run a Ray node (CMD: `ray start --block ...`) as the task of a
                                   job step: see run_node
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import List

from distlm.runtime import free_port


def head_address() -> str:
    import ray.util

    return f"{ray.util.get_node_ip_address()}:{free_port('')}"


def _reachable(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def _exited(pids: List[int]) -> List[int]:
    """The watched processes (our children) that have exited."""
    gone = []
    for pid in pids:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                gone.append(pid)
        except ChildProcessError:  # not our child (the shell's): check that it still exists
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                gone.append(pid)
    return gone


def wait_for_nodes(address: str, count: int, timeout_s: float, pids: List[int] = ()) -> int:
    """Poll the cluster until `count` nodes are alive; returns how many are. Raises TimeoutError,
    or RuntimeError when a watched Ray node process exits first."""
    import ray

    deadline = time.monotonic() + timeout_s
    alive = 0
    while time.monotonic() < deadline:
        gone = _exited(list(pids))
        if gone:
            raise RuntimeError(f"a Ray node exited before the cluster was up (pid {', '.join(map(str, gone))})")
        # ray.init retries an unreachable GCS for minutes: connect only once the port answers.
        if _reachable(address):
            if not ray.is_initialized():
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            alive = sum(1 for node in ray.nodes() if node["Alive"])
            if alive >= count:
                return alive
        time.sleep(1)
    raise TimeoutError(f"only {alive} of {count} Ray nodes joined {address} within {timeout_s:.0f}s")


def run_node(cmd: List[str], stop_grace_s: float = 30) -> int:
    """Run a Ray node as a job step's task and shield it from the step's SIGTERM.

    `scancel --signal=TERM <job>` signals the job's steps, not the batch script that holds the
    driver; with proctrack/cgroup Slurm delivers it to the step's task only (this process),
    not to Ray's processes below it. It is relayed to the batch script
    (`scancel --batch --signal=TERM`), which has the run save a checkpoint and requeues the job,
    while this Ray node keeps serving the workers until then. SIGUSR1 (from the batch script,
    through srun, once training has ended) stops the node."""
    try:
        child = subprocess.Popen(cmd)
    except OSError as e:
        print(f"distlm: error: cannot start the Ray node ({' '.join(cmd)}): {e}", file=sys.stderr)
        return 127
    state = {"relayed": False, "stopping": False}

    def relay(signum, frame) -> None:
        job = os.environ.get("SLURM_JOB_ID")
        if state["relayed"] or state["stopping"] or not job:
            return
        state["relayed"] = True
        print(f"distlm: SIGTERM to the Ray node step: relayed to job {job}'s batch script", file=sys.stderr, flush=True)
        subprocess.run(["scancel", "--batch", "--signal=TERM", job], timeout=60)

    def stop(signum, frame) -> None:
        if not state["stopping"]:
            state["stopping"] = time.monotonic()
            child.terminate()  # `ray start --block` stops the node's processes on SIGTERM

    signal.signal(signal.SIGTERM, relay)
    signal.signal(signal.SIGUSR1, stop)
    while True:
        try:
            rc = child.wait(timeout=1)
            break
        except subprocess.TimeoutExpired:
            if state["stopping"] and time.monotonic() - state["stopping"] > stop_grace_s:
                child.kill()
    return 0 if state["stopping"] else rc


def main(argv: List[str]) -> int:
    if argv == ["address"]:
        print(head_address())
        return 0
    if argv == ["port"]:
        print(free_port())
        return 0
    if argv[:1] == ["wait"] and len(argv) >= 4:
        address, count, timeout_s, pids = argv[1], int(argv[2]), float(argv[3]), [int(p) for p in argv[4:]]
        try:
            alive = wait_for_nodes(address, count, timeout_s, pids)
        except (TimeoutError, RuntimeError) as e:
            print(f"distlm: error: {e}: see the slurm-<job>-ray-<node>.out files in the run dir", file=sys.stderr)
            return 1
        print(f"distlm: {alive} Ray node(s) alive at {address}")
        return 0
    if argv[:1] == ["node"] and argv[1:2] == ["--"] and len(argv) > 2:
        return run_node(argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
