#!/usr/bin/env python3
"""A single-node Slurm cluster in one folder: for trying `harness run --executor submitit` on one
machine, and the cluster of tests/harness/test_slurm.py (through tests/harness/slurm_cluster.py).

    sudo python3 scripts/slurm_local.py start [DIR]       # bring it up; prints the SLURM_CONF to export
    sudo python3 scripts/slurm_local.py stop DIR          # cancel its jobs, stop its daemons (by PID)
    sudo python3 scripts/slurm_local.py run [--dir DIR] -- COMMAND ...   # up, COMMAND, down (and removed)

Needs Linux, root and Debian's Slurm and MUNGE (`apt-get install slurm-wlm munge`; Slurm 22.05 on
Debian 12). Everything lives in DIR (a new temporary folder by default): a fresh MUNGE key and
socket, slurm.conf, free TCP ports, state, spool and logs; munged, slurmctld and slurmd run in the
foreground (no daemonising, so their PIDs are known) and are stopped by those PIDs, never by name.
Nothing under /etc is read or written, and a system Slurm or munged on the same host is left alone.
Clients find the cluster through `SLURM_CONF=DIR/slurm.conf` (the MUNGE socket is named in it).

The cluster: one node (this host, with the CPUs this process may use and 90% of its memory,
CPUs shared among jobs: select/cons_tres with CR_Core), one partition `debug`, SlurmUser=root,
proctrack/linuxproc and task/none (no cgroups needed). No accounting daemon:
`AccountingStorageType=accounting_storage/none`, so `sacct` answers "Slurm accounting storage is
disabled"; `JobCompType=jobcomp/filetxt` writes one line per ended job to DIR/log/jobcomp.txt
(`jobcomp_records`), and `scontrol show job` keeps ended jobs for MinJobAge=300 s. A requeued job
waits `cred_expire` (10 s here, Slurm's default 120 s) before it may start again.

Standard library only, so it runs with any python3 >= 3.10.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")  # started in this order, stopped in the reverse one
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
PARTITION = "debug"
STATE_FILE = "cluster.json"  # node, CPUs, ports and daemon PIDs, for `stop` from another process
MIN_JOB_AGE_S = 300  # how long `scontrol show job` remembers an ended job
CRED_EXPIRE_S = 10  # also how long a requeued job waits before it may start again
KILL_WAIT_S = 5  # SIGTERM -> SIGKILL of a cancelled or timed-out job
SCHED_INTERVAL_S = 2  # scheduling passes (Slurm: 60 s main, 30 s backfill): a requeued job starts soon after it may


class ClusterUnavailable(Exception):
    """The cluster cannot be brought up here; str says why (missing package, not root, a daemon died)."""


@dataclass
class Cluster:
    """A running single-node cluster: its folder, node and daemons."""

    folder: Path
    node: str
    cpus: int
    pids: dict[str, int]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)  # when started here

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    @property
    def jobcomp(self) -> Path:
        return self.folder / "log" / "jobcomp.txt"

    @property
    def partition(self) -> str:
        return PARTITION

    def env(self) -> dict[str, str]:
        """The environment variables a Slurm client needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of each daemon's log (for error messages)."""
        parts = []
        for name in DAEMONS:
            log = self.folder / "log" / f"{name}.log"
            text = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else ["(no log)"]
            parts.append(f"--- {log}\n" + "\n".join(text))
        return "\n".join(parts)


# --------------------------------------------------------------------------- checks and configuration


def find_program(name: str) -> str | None:
    """The path of `name` on PATH, or in /usr/sbin and /sbin (daemons; not on every user's PATH)."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started on this machine, or None when it can be tried."""
    if not sys.platform.startswith("linux"):
        return f"a local Slurm cluster needs Linux, not {sys.platform}"
    missing = [name for name in (*DAEMONS, *CLIENTS) if find_program(name) is None]
    if missing:
        return f"Slurm/MUNGE not installed (missing {', '.join(missing)}; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "a local Slurm cluster runs its daemons as root (SlurmUser=root): run as root"
    return None


def usable_cpus() -> int:
    """The CPUs this process may run on (what `nproc` says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def node_memory_mib(fraction: float = 0.9) -> int:
    """`fraction` of this host's memory in MiB (slurmd drains a node configured with more than it has)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(int(line.split()[1]) / 1024 * fraction)
    raise ClusterUnavailable("cannot read MemTotal from /proc/meminfo")


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def slurm_conf(folder: Path, node: str, cpus: int, memory_mib: int, ports: tuple[int, int]) -> str:
    """slurm.conf of a one-node cluster whose files are all under `folder`."""
    return f"""\
# A single-node test cluster (scripts/slurm_local.py); every file under {folder}.
ClusterName=harness-local
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge/munge.socket,cred_expire={CRED_EXPIRE_S}
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/run/slurmctld.pid
SlurmdPidFile={folder}/run/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={folder}/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval={SCHED_INTERVAL_S},bf_interval={SCHED_INTERVAL_S}
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
MinJobAge={MIN_JOB_AGE_S}
KillWait={KILL_WAIT_S}
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mib} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _write_munge_key(path: Path) -> None:
    path.write_bytes(secrets.token_bytes(128))
    path.chmod(0o400)


def _prepare(folder: Path, node: str, cpus: int) -> None:
    for sub in ("munge", "state", "spool", "log", "run"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)  # munged wants its socket's folders searchable by everyone
    (folder / "munge").chmod(0o755)
    _write_munge_key(folder / "munge" / "munge.key")
    (folder / "slurm.conf").write_text(slurm_conf(folder, node, cpus, node_memory_mib(), (free_port(), free_port())))


def _commands(folder: Path, node: str) -> dict[str, list[str]]:
    munge = folder / "munge"
    conf = str(folder / "slurm.conf")
    return {
        # --force: accept a socket path with a non-searchable parent (e.g. pytest's 0700 basetemp)
        "munged": [
            find_program("munged") or "munged",
            "--foreground",
            "--force",
            "--num-threads=10",
            f"--socket={munge}/munge.socket",
            f"--key-file={munge}/munge.key",
            f"--pid-file={munge}/munged.pid",
            f"--seed-file={munge}/munged.seed",
            f"--log-file={folder}/log/munged.file.log",
        ],
        "slurmctld": [find_program("slurmctld") or "slurmctld", "-D", "-i", "-f", conf],
        "slurmd": [find_program("slurmd") or "slurmd", "-D", "-N", node, "-f", conf],
    }


# --------------------------------------------------------------------------- start, wait, stop


def client(cluster: Cluster, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess:
    """Run a Slurm client command (`squeue`, `scontrol`, ...) against `cluster`; never raises on its exit code."""
    env = {**os.environ, **cluster.env()}
    return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)


def _spawn(name: str, command: list[str], folder: Path) -> subprocess.Popen:
    """Start one daemon in the foreground, its output appended to log/<name>.log."""
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    with open(folder / "log" / f"{name}.log", "ab") as log:  # the child keeps its own copy of the file
        # A session of its own: a Ctrl-C meant for the caller does not reach the daemons.
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_for_munge(folder: Path, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not (folder / "munge" / "munge.socket").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise ClusterUnavailable("munged did not create its socket")
        time.sleep(0.1)


def wait_for_node(cluster: Cluster, timeout_s: float = 60) -> None:
    """Return once `sinfo` shows the node idle; ClusterUnavailable (with the logs) when it does not in time."""
    deadline = time.monotonic() + timeout_s
    state = "(no answer)"
    while time.monotonic() < deadline:
        for name, process in cluster.processes.items():
            if process.poll() is not None:
                raise ClusterUnavailable(f"{name} exited with code {process.returncode}\n{cluster.log_tail()}")
        answer = client(cluster, "sinfo", "-h", "-n", cluster.node, "-o", "%T")
        if answer.returncode == 0 and answer.stdout.strip():
            state = answer.stdout.strip()
            if state == "idle":
                return
        time.sleep(0.5)
    raise ClusterUnavailable(f"node {cluster.node} not idle after {timeout_s:g} s (state {state})\n{cluster.log_tail()}")


def start(folder: str | Path | None = None, cpus: int | None = None, timeout_s: float = 60) -> Cluster:
    """Bring up munged, slurmctld and slurmd with everything in `folder` (default: a new temporary
    folder) and wait for the node; ClusterUnavailable when that is not possible here."""
    reason = unavailable_reason()
    if reason:
        raise ClusterUnavailable(reason)
    folder = Path(folder or tempfile.mkdtemp(prefix="slurm-local-")).resolve()
    node = socket.gethostname().split(".")[0]
    cluster = Cluster(folder, node, cpus or usable_cpus(), {})
    _prepare(folder, node, cluster.cpus)
    try:
        for name, command in _commands(folder, node).items():
            process = _spawn(name, command, folder)
            cluster.processes[name], cluster.pids[name] = process, process.pid
            _save_state(cluster)
            if name == "munged":
                _wait_for_munge(folder, process, timeout_s)
        wait_for_node(cluster, timeout_s)
    except BaseException:
        stop(cluster)
        raise
    return cluster


def _save_state(cluster: Cluster) -> None:
    state = {"node": cluster.node, "cpus": cluster.cpus, "pids": cluster.pids}
    (cluster.folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def load(folder: str | Path) -> Cluster:
    """The cluster started in `folder` (by this or another process), from its state file."""
    folder = Path(folder).resolve()
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as error:
        raise ClusterUnavailable(f"{folder}: no local cluster here ({error})") from None
    return Cluster(folder, state["node"], int(state["cpus"]), {k: int(v) for k, v in state["pids"].items()})


def _is_ours(pid: int, folder: Path) -> bool:
    """Whether `pid` still runs a daemon of `folder` (its command line names the folder): a PID
    from the state file may have been reused by an unrelated process since."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return str(folder) in cmdline


def _end_process(name: str, pid: int, cluster: Cluster, timeout_s: float = 10) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`, to one daemon, by its PID."""
    process = cluster.processes.get(name)
    if process is not None:  # our child: wait() also reaps it
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return
    if not _is_ours(pid, cluster.folder):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _is_ours(pid, cluster.folder) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _is_ours(pid, cluster.folder):
        os.kill(pid, signal.SIGKILL)


def cancel_all_jobs(cluster: Cluster, timeout_s: float = 30) -> None:
    """Cancel every job of the cluster and wait (at most `timeout_s`) until the queue is empty, so
    no job step outlives the daemons."""
    if cluster.pids.get("slurmctld") is None:
        return
    listed = client(cluster, "squeue", "-h", "-o", "%A")
    ids = sorted(set(listed.stdout.split())) if listed.returncode == 0 else []
    if not ids:
        return
    client(cluster, "scancel", *ids)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = client(cluster, "squeue", "-h", "-o", "%A")
        if listed.returncode != 0 or not listed.stdout.strip():
            return
        time.sleep(0.5)


def stop(cluster: Cluster) -> None:
    """Cancel the cluster's jobs, then stop slurmd, slurmctld and munged by their PIDs."""
    try:
        cancel_all_jobs(cluster)
    except (OSError, subprocess.SubprocessError):
        pass  # the daemons go anyway
    for name in reversed(DAEMONS):
        pid = cluster.pids.get(name)
        if pid is not None:
            _end_process(name, pid, cluster)


def jobcomp_records(cluster: Cluster) -> list[dict[str, str]]:
    """The jobcomp/filetxt log: one dict per ended (or requeued) job, `Key=Value` fields as strings."""
    if not cluster.jobcomp.exists():
        return []
    records = []
    for line in cluster.jobcomp.read_text(errors="replace").splitlines():
        fields = dict(token.split("=", 1) for token in line.split() if "=" in token)
        if fields:
            records.append(fields)
    return records


# --------------------------------------------------------------------------- command line


def _start_command(args: argparse.Namespace) -> int:
    cluster = start(args.dir, args.cpus)
    print(f"single-node Slurm up: node {cluster.node} ({cluster.cpus} CPUs), partition {PARTITION}, folder {cluster.folder}")
    print(f"export SLURM_CONF={cluster.conf}")
    print(f"stop it with: python3 {sys.argv[0]} stop {cluster.folder}")
    return 0


def _stop_command(args: argparse.Namespace) -> int:
    stop(load(args.dir))
    print(f"stopped the cluster in {Path(args.dir).resolve()}")
    return 0


def _run_command(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ClusterUnavailable("run: give a command after --")
    cluster = start(args.dir, args.cpus)
    try:
        print(f"[slurm_local] node {cluster.node} idle; SLURM_CONF={cluster.conf}", flush=True)
        return subprocess.run(command, env={**os.environ, **cluster.env()}).returncode
    finally:
        stop(cluster)
        if args.dir is None:  # a temporary folder of ours (give --dir to keep the logs)
            shutil.rmtree(cluster.folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="action", required=True)
    up = commands.add_parser("start", help="bring a cluster up in DIR (default: a new temporary folder) and leave it running")
    up.add_argument("dir", nargs="?")
    up.add_argument("--cpus", type=int, help="CPUs of the node (default: what nproc says)")
    up.set_defaults(handler=_start_command)
    down = commands.add_parser("stop", help="cancel the jobs of the cluster in DIR and stop its daemons")
    down.add_argument("dir")
    down.set_defaults(handler=_stop_command)
    run = commands.add_parser("run", help="bring a cluster up, run COMMAND with SLURM_CONF set, bring it down")
    run.add_argument("--dir")
    run.add_argument("--cpus", type=int)
    run.add_argument("command", nargs=argparse.REMAINDER)
    run.set_defaults(handler=_run_command)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ClusterUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
