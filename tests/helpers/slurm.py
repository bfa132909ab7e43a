"""A real one-node Slurm cluster for the launcher tests: munged, slurmctld and slurmd on loopback.

Installs Debian's packages when they are missing (CI runs as root with the Debian
registry reachable), writes a configuration for this machine into a temp dir, starts the
daemons in the foreground as our own children and stops them by process id. Nothing
touches the system's own Slurm or munge configuration.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

from distlm.runtime import free_port

PACKAGES = {"slurmctld": "slurmctld", "slurmd": "slurmd", "munged": "munge", "sbatch": "slurm-client"}


class SlurmSetupError(RuntimeError):
    pass


def _sbin(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def install_packages() -> None:
    missing = sorted({pkg for tool, pkg in PACKAGES.items() if _sbin(tool) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmSetupError(f"Slurm packages {missing} are missing and installing them needs root: apt-get install")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *missing]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise SlurmSetupError(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def _node_line() -> str:
    """This machine as slurmd sees it (`slurmd -C`): CPUs, sockets, cores, memory."""
    out = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("NodeName="))
    return line


@dataclass
class SlurmCluster:
    root: Path
    node: str = ""
    env: Dict[str, str] = field(default_factory=dict)
    procs: List[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def start(self, timeout: float = 120) -> None:
        install_packages()
        root = self.root
        for d in ("state", "spool", "munge", "log"):
            (root / d).mkdir(parents=True, exist_ok=True)
        # munged refuses group/world-writable directories on its paths.
        for d in (root, root / "munge", root / "log"):
            d.chmod(0o700)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        socket_path = root / "munge" / "munge.socket"
        node_line = _node_line()
        self.node = node_line.split()[0].split("=", 1)[1]
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=distlmtest",
                    f"SlurmctldHost={self.node}(127.0.0.1)",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    # cred_expire: how long a requeued job is held (and its old credential
                    # revoked); 120 s by default, short here so the requeue tests do not wait.
                    f"AuthInfo=socket={socket_path},cred_expire=10",
                    f"StateSaveLocation={root / 'state'}",
                    f"SlurmdSpoolDir={root / 'spool'}",
                    f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                    f"SlurmdPidFile={root / 'slurmd.pid'}",
                    f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                    # Slurm's recommended tracking: non-KILL signals to a step reach its task only.
                    "ProctrackType=proctrack/cgroup",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "SchedulerType=sched/builtin",
                    # A requeued job becomes eligible once its hold (cred_expire) ends, with no event
                    # to schedule it: the main loop's pass (every 60 s by default) starts it.
                    "SchedulerParameters=sched_interval=2",
                    "MpiDefault=none",
                    # GPU requests parse (sbatch --test-only), though this node has none.
                    "GresTypes=gpu",
                    "ReturnToService=2",
                    "SlurmctldTimeout=30",
                    "SlurmdTimeout=60",
                    "KillWait=10",
                    "MinJobAge=600",
                    f"{node_line} NodeAddr=127.0.0.1 State=UNKNOWN",
                    f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        # slurmd reads cgroup.conf beside slurm.conf; no systemd here to create scopes.
        (root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\n")
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._spawn(
            [
                _sbin("munged"),
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={socket_path}",
                f"--pid-file={root / 'munge' / 'munged.pid'}",
                f"--log-file={root / 'log' / 'munged.log'}",
                f"--seed-file={root / 'munge' / 'munged.seed'}",
            ],
            "munged",
        )
        self._wait(lambda: socket_path.exists(), 30, "munged's socket")
        self._spawn([_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._wait(lambda: self._run(["scontrol", "ping"]).stdout.count("UP") > 0, timeout, "slurmctld to answer")
        self._spawn([_sbin("slurmd"), "-D", "-f", str(self.conf), "-N", self.node], "slurmd")
        self._wait(lambda: self.node_state() == "idle", timeout, f"node {self.node} to be idle in sinfo")

    def node_state(self) -> str:
        return self._run(["sinfo", "-h", "-N", "-n", self.node, "-o", "%T"]).stdout.strip()

    def _run(self, cmd: List[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)

    def _spawn(self, cmd: List[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise SlurmSetupError(
                        f"{p.args[0]} exited with {p.returncode} while waiting for {what}:\n{self.logs()}"
                    )
            if predicate():
                return
            time.sleep(0.5)
        raise SlurmSetupError(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop our daemons by pid (slurmd first: it ends what is left of jobs)."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()
