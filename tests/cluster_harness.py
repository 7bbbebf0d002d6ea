"""A real multi-node Ray cluster on one machine, for tests: a head node plus worker nodes in network namespaces.

Why namespaces rather than several ``ray start`` on loopback: every worker node gets a network stack and an
IP address of its own (``10.213.N.k`` on a private bridge that reaches no physical interface), so the
cluster behaves like separate machines (nodes talk over addresses, not over 127.0.0.1 shortcuts) while all
traffic stays on this host. What the namespaces do not separate is the filesystem: every node sees the
same disk, which plays the part of the shared storage (NFS, EFS) a real cluster mounts on every node.

Why so many explicit ports and a private ``--temp-dir``: other Ray instances run on the same machine at
the same time, and the head lives in the root namespace beside them. Nothing here ever runs ``ray stop``
(it would stop every Ray instance of the machine); each process this harness starts is stopped through
its own process id and the process tree below it.

Ray 2.60 enables token authentication for local clusters, and nodes that join with ``ray start --address``
must present the same token: every process gets ``RAY_AUTH_MODE=token`` and a fresh ``RAY_AUTH_TOKEN``, so
nothing is read from or written to ``~/.ray/auth_token``.
"""

from __future__ import annotations

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
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
SUBNET_PREFIX = "10.213"
# Object store per node: the test data is tiny, and every node's store is a file in the shared /dev/shm.
OBJECT_STORE_BYTES = 256 * 2**20
# Node-death detection within a few seconds instead of Ray's ~15 s default, so fault tests stay short.
FAST_HEALTH_CHECKS = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
# Head ports (root namespace, shared with other Ray instances): named ports, then the worker port range.
HEAD_PORT_NAMES = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)
WORKER_PORTS = 200


class ClusterError(RuntimeError):
    """The cluster could not be built or did not behave; the message says what to check."""


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise ClusterError(f"`{' '.join(command)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def require_network_namespaces() -> None:
    """Fail with a clear message where worker nodes cannot get a network namespace of their own."""
    if shutil.which("ip") is None:
        raise ClusterError("the multi-node tests need the `ip` command (iproute2) to create network namespaces")
    probe = f"stfpm-{os.getpid()}-probe"
    result = _run("ip", "netns", "add", probe, check=False)
    if result.returncode != 0:
        raise ClusterError(
            "the multi-node tests need `ip netns add` (root or CAP_SYS_ADMIN + CAP_NET_ADMIN) to give each worker "
            f"node its own network stack; it failed: {result.stderr.strip()}"
        )
    _run("ip", "netns", "del", probe, check=False)


def _free_subnet() -> str:
    """A ``10.213.N`` /24 that no interface or route of this host uses yet (starting from one picked by pid,
    so two test runs started at the same moment are unlikely to race for the same one)."""
    used = _run("ip", "-o", "-4", "addr", "show").stdout + _run("ip", "-o", "-4", "route", "show").stdout
    for i in range(256):
        n = (os.getpid() + i) % 256
        if f"{SUBNET_PREFIX}.{n}." not in used:
            return f"{SUBNET_PREFIX}.{n}"
    raise ClusterError(f"no free /24 under {SUBNET_PREFIX}.0.0/16 for the test cluster's bridge")


def _port_block(count: int) -> int:
    """The first of ``count`` consecutive free ports, between Ray's default worker ports and the ephemeral range."""
    rng = secrets.SystemRandom()
    for _ in range(50):
        base = rng.randrange(20000, 30000 - count)
        sockets = []
        try:
            for port in range(base, base + count):
                sockets.append(socket.socket())
                sockets[-1].bind(("0.0.0.0", port))  # fails if anything listens on this port, any address
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise ClusterError(f"no {count} consecutive free ports found between 20000 and 30000")


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc (children first found, then theirs)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _processes_using(folder: Path) -> list[int]:
    """Processes with a file open under ``folder``: every Ray process logs into its node's temp dir, so this
    finds those whose parent died before them (orphans leave the process tree ``_descendants`` walks)."""
    prefix, found = str(folder) + "/", []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd).startswith(prefix) for fd in (entry / "fd").iterdir()):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def remove_stale_clusters() -> None:
    """Remove what a test process killed outright (no finalizer ran) left behind: its Ray processes, network
    namespaces, bridge and temp folder. Everything is named after the creating pid; only dead owners' go."""
    for folder in Path("/tmp").glob("stfpm-rc-*-*"):
        owner = folder.name.split("-")[2]
        if owner.isdigit() and not _alive(int(owner)):
            _kill(_processes_using(folder))
            shutil.rmtree(folder, ignore_errors=True)
    for line in _run("ip", "netns", "list").stdout.splitlines():
        namespace = line.split()[0] if line.strip() else ""
        parts = namespace.split("-")
        if len(parts) == 3 and parts[0] == "stfpm" and parts[1].isdigit() and not _alive(int(parts[1])):
            _kill([int(pid) for pid in _run("ip", "netns", "pids", namespace, check=False).stdout.split()])
            _run("ip", "netns", "del", namespace, check=False)
    for line in _run("ip", "-o", "link", "show", "type", "bridge").stdout.splitlines():
        name = line.split(":")[1].strip()
        if name.startswith("stbr") and name[4:].isdigit() and not _alive(int(name[4:])):
            _run("ip", "link", "del", name, check=False)


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process we started, its process group and every process below it; then reap it."""
    if process.poll() is None:
        tree = _descendants(process.pid)
        try:
            os.killpg(process.pid, signal.SIGKILL)  # started with start_new_session: its pid is its group
        except ProcessLookupError:
            pass
        _kill(tree)
    process.wait(timeout=30)


@dataclass
class WorkerNode:
    """One worker node: a ``ray start --block`` inside its own network namespace."""

    name: str
    namespace: str
    ip: str
    process: subprocess.Popen
    log: Path

    def pids(self) -> list[int]:
        """Every process running in this node's namespace (its raylet, agents and Ray workers)."""
        output = _run("ip", "netns", "pids", self.namespace, check=False).stdout
        return [int(pid) for pid in output.split()]

    def process_titles(self) -> list[str]:
        """Command lines of this node's processes; Ray workers show as ``ray::ActorClass.method``."""
        titles = []
        for pid in self.pids():
            try:
                titles.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
            except OSError:
                continue
        return titles


@dataclass
class JobResult:
    returncode: int
    output: str  # what `ray job submit` printed: the job's own output, streamed, then its final status


@dataclass
class LocalCluster:
    """A head node (no CPUs: all work lands on workers, as on a cluster whose head only coordinates) plus
    worker nodes in network namespaces; use as a context manager so everything is stopped on any failure."""

    root: Path
    head_cpus: int = 0
    worker_cpus: int = 2
    tag: str = field(default_factory=lambda: str(os.getpid()))  # names what this process creates
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    workers: list[WorkerNode] = field(default_factory=list)
    _head: subprocess.Popen | None = None
    _ports: dict[str, int] = field(default_factory=dict)
    _namespaces: list[str] = field(default_factory=list)
    _bridge: str | None = None
    _subnet: str = ""
    _temp_root: Path | None = None
    _clients: list[subprocess.Popen] = field(default_factory=list)  # `ray job submit` processes

    # ------------------------------------------------------------------------------------------ setup

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def head_ip(self) -> str:
        return f"{self._subnet}.1"

    @property
    def gcs_address(self) -> str:
        return f"{self.head_ip}:{self._ports['port']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head_ip}:{self._ports['dashboard-port']}"

    def env(self) -> dict[str, str]:
        """Environment of every process that talks to the cluster: token auth, this venv first on PATH.

        ``RAY_API_SERVER_ADDRESS`` pins Ray's state-API clients inside the cluster (Ray Train's placement
        group cleaner, for one) to this head: left to auto-detection they look for GCS processes on the
        machine, find the other Ray instances running here, and give up.
        """
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            RAY_API_SERVER_ADDRESS=self.dashboard_url,
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            PYTHONUNBUFFERED="1",
            **FAST_HEALTH_CHECKS,
        )
        return env

    def start(self) -> None:
        require_network_namespaces()
        remove_stale_clusters()
        # Short paths: Ray's Unix sockets live under the temp dir and socket paths are limited to 107 bytes.
        self._temp_root = Path(tempfile.mkdtemp(prefix=f"stfpm-rc-{self.tag}-", dir="/tmp"))
        self._subnet = _free_subnet()
        self._bridge = f"stbr{self.tag}"
        _run("ip", "link", "add", self._bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.head_ip}/24", "dev", self._bridge)
        _run("ip", "link", "set", self._bridge, "up")
        self._start_head()
        self.add_worker()

    def _start_head(self) -> None:
        base = _port_block(len(HEAD_PORT_NAMES) + WORKER_PORTS)
        self._ports = {name: base + i for i, name in enumerate(HEAD_PORT_NAMES)}
        first_worker_port = base + len(HEAD_PORT_NAMES)
        command = [
            RAY,
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            f"--node-ip-address={self.head_ip}",
            f"--dashboard-host={self.head_ip}",
            *(f"--{name}={port}" for name, port in self._ports.items()),
            f"--min-worker-port={first_worker_port}",
            f"--max-worker-port={first_worker_port + WORKER_PORTS - 1}",
            f"--num-cpus={self.head_cpus}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--temp-dir={self._temp_root / 'head'}",
        ]
        log = self.root / "head.log"
        self._head = _start(command, self.env(), log)
        self._wait(lambda: self.head_ip in self.alive_node_ips(), 90, "the head node to come up", log, self._head)

    def add_worker(self) -> WorkerNode:
        """Start one more worker node in a new namespace and wait until the head lists it alive."""
        index = len(self._namespaces) + 1
        namespace, ip = f"stfpm-{self.tag}-{index}", f"{self._subnet}.{index + 1}"
        host_end, node_end = f"stv{self.tag}h{index}", f"stv{self.tag}n{index}"
        _run("ip", "netns", "add", namespace)
        self._namespaces.append(namespace)
        _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end)
        _run("ip", "link", "set", host_end, "master", self._bridge)
        _run("ip", "link", "set", host_end, "up")
        _run("ip", "link", "set", node_end, "netns", namespace)
        for command in (
            ("ip", "addr", "add", f"{ip}/24", "dev", node_end),
            ("ip", "link", "set", node_end, "up"),
            ("ip", "link", "set", "lo", "up"),
        ):
            _run("ip", "netns", "exec", namespace, *command)
        log = self.root / f"worker-{index}.log"
        process = _start(
            [
                "ip",
                "netns",
                "exec",
                namespace,
                RAY,
                "start",
                "--block",
                "--disable-usage-stats",
                f"--address={self.gcs_address}",
                f"--node-ip-address={ip}",
                f"--num-cpus={self.worker_cpus}",
                f"--object-store-memory={OBJECT_STORE_BYTES}",
                f"--temp-dir={self._temp_root / f'worker-{index}'}",
            ],
            self.env(),
            log,
        )
        node = WorkerNode(f"worker-{index}", namespace, ip, process, log)
        self.workers.append(node)
        self._wait(lambda: ip in self.alive_node_ips(), 90, f"{node.name} ({ip}) to join", log, process)
        return node

    def kill_worker(self, node: WorkerNode, timeout: float = 10) -> None:
        """Lose a node as a machine would: SIGKILL its ``ray start`` group, then anything left in its namespace
        until nothing is (a process forked while the others were being killed needs a second round)."""
        _kill_tree(node.process)
        deadline = time.monotonic() + timeout
        while survivors := node.pids():
            if time.monotonic() > deadline:
                raise ClusterError(f"processes {survivors} survive SIGKILL in namespace {node.namespace}")
            _kill(survivors)
            time.sleep(0.1)

    def wait_node_dead(self, node: WorkerNode, timeout: float = 60) -> None:
        self._wait(
            lambda: node.ip not in self.alive_node_ips(),
            timeout,
            f"the head to notice {node.name} died",
            node.log,
            None,
        )

    # ------------------------------------------------------------------------------------------ queries

    def _get(self, path: str) -> dict:
        request = urllib.request.Request(self.dashboard_url + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def alive_nodes(self) -> list[dict]:
        """The head's view of its nodes (Ray state API), alive ones only."""
        try:
            nodes = self._get("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        except OSError:
            return []
        return [n for n in nodes if n["state"] == "ALIVE"]

    def alive_node_ips(self) -> set[str]:
        return {n["node_ip"] for n in self.alive_nodes()}

    def _wait(self, ready, timeout: float, what: str, log: Path, process: subprocess.Popen | None) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if process is not None and process.poll() is not None:
                raise ClusterError(
                    f"gave up waiting for {what}: the process exited ({process.returncode}); "
                    f"last lines of {log}:\n{_tail(log)}"
                )
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"gave up waiting for {what} after {timeout:.0f} s; last lines of {log}:\n{_tail(log)}"
                )
            time.sleep(0.5)

    # ------------------------------------------------------------------------------------------ jobs

    def submit(self, args: list[str], timeout: float, log_name: str) -> JobResult:
        """``ray job submit --working-dir <repo> -- python jobs/...``: blocks, streams the job's output to a log."""
        process = self.submit_async(args, log_name)
        return self.wait_job(process, timeout, log_name)

    def submit_async(self, args: list[str], log_name: str) -> subprocess.Popen:
        command = [RAY, "job", "submit", "--address", self.dashboard_url, "--working-dir", str(REPO), "--", "python"]
        self._clients.append(_start([*command, *args], self.env(), self.root / log_name))
        return self._clients[-1]

    def wait_job(self, process: subprocess.Popen, timeout: float, log_name: str) -> JobResult:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(process)
            raise ClusterError(
                f"job did not finish within {timeout:.0f} s; last lines:\n{_tail(self.root / log_name)}"
            ) from None
        return JobResult(process.returncode, (self.root / log_name).read_text())

    def job_log(self, log_name: str) -> str:
        path = self.root / log_name
        return path.read_text() if path.exists() else ""

    # ------------------------------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Stop every process this cluster started (job clients, workers, head), delete namespaces, bridge and
        temp files."""
        for client in self._clients:
            _kill_tree(client)
        for node in self.workers:
            self.kill_worker(node)
        if self._head is not None:
            _kill_tree(self._head)
        if self._temp_root is not None:
            _kill(_processes_using(self._temp_root))
        for namespace in self._namespaces:
            _run("ip", "netns", "del", namespace, check=False)  # takes the veth pair with it
        if self._bridge is not None:
            _run("ip", "link", "del", self._bridge, check=False)
        if self._temp_root is not None:
            shutil.rmtree(self._temp_root, ignore_errors=True)


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a process in a session of its own (so its pid names its process group), output to ``log``."""
    with log.open("w") as handle:
        return subprocess.Popen(
            command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
