"""Connecting to Ray: an existing cluster by address, or a local instance started in-process.

The local default binds loopback only, so a demo on a laptop or CI machine never opens ports on the
network. Ray decides that from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``, which it reads once, when ``ray`` is
first imported: setting the variable at ``init`` time (after the import) is too late for this process, so
the local branch also sets the constant Ray read from it, and the variable for the processes Ray spawns.
Those and Ray Train's Torch backend (:mod:`stfpm_ray.ray.loopback_torch`, which keeps local training on
loopback too) are this project's only touches of Ray's private modules, each imported in one guarded place.

The terminal belongs to stfpm-ray's own progress lines: unless ``STFPM_RAY_VERBOSE=1`` (the CLI's ``-v``
sets it), worker logs stay in Ray's log files (``log_to_driver=False``), Ray's own driver
messages below ERROR are dropped, Tune prints no banner and writes no TensorBoard/CSV loggers, and Ray Data
shows no progress bars and no execution banner.
"""

from __future__ import annotations

import logging
import os
import sys

import ray
import ray.data

from stfpm_ray.progress import VERBOSE_VARIABLE

try:  # private Ray modules, present in the Ray versions this project supports (2.52 to 2.60)
    from ray._private import ray_constants as _ray_constants
    from ray._private.state import state as _ray_state
except ImportError:  # pragma: no cover - a later Ray moved them; see the two users below
    _ray_constants = _ray_state = None

log = logging.getLogger(__name__)
LOOPBACK_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Worker processes a local instance starts at once. Ray's default is the CPU count, and its raylet prints a
# WARNING on the driver's terminal (past log_to_driver, with colour codes) once four times that many workers
# exist: on a 2-CPU machine that is the 8 processes of any train or benchmark run (Tune, Train workers, Ray Data
# tasks, scoring actors), a warning with nothing to act on. A local node's workers are bounded by this
# project's own pools, so the warning would mean nothing there below 4 x 16.
LOCAL_STARTUP_CONCURRENCY = 16
# Read by Tune when a run starts: the legacy reporter at verbose=0 prints nothing (the newer one prints a
# configuration box and a TensorBoard hint into Ray's temporary folder), and no automatic file loggers.
_QUIET_RAY = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}


def _quiet_output() -> bool:
    """Keep Ray's own output off the terminal (see the module doc); True unless STFPM_RAY_VERBOSE=1."""
    verbose = os.environ.get(VERBOSE_VARIABLE) == "1"
    for name, value in _QUIET_RAY.items():
        if not verbose:
            os.environ.setdefault(name, value)
    if not verbose:  # Ray Data warns, at WARNING, that the progress bars it was told to hide are hidden
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = verbose
    return not verbose


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (``auto``, ``ray://...`` or ``HOST:PORT``), or start a local instance.

    Does nothing when Ray is already initialised in this process (tests share one instance, and a job
    submitted with ``ray job submit`` is connected by Ray itself through ``RAY_ADDRESS``).
    """
    quiet = _quiet_output()
    if ray.is_initialized():
        return
    output = {"log_to_driver": not quiet, "logging_level": logging.ERROR if quiet else logging.INFO}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray cluster at %s", address)
        context = ray.init(address=address, **output)
    else:
        _keep_on_loopback()
        log.info("starting a local Ray instance (use --address to join a cluster)")
        # The dashboard (on 127.0.0.1) also serves the state API that Ray Train polls for progress.
        context = ray.init(
            num_cpus=num_cpus,
            dashboard_host="127.0.0.1",
            _system_config={"worker_maximum_startup_concurrency": LOCAL_STARTUP_CONCURRENCY},
            **output,
        )
    if quiet:
        _native_stderr_to(os.path.join(context.address_info["session_dir"], "logs", f"driver-{os.getpid()}.err"))


def _native_stderr_to(path: str) -> None:
    """Send what native code writes to file descriptor 2 into ``path``; Python's ``sys.stderr`` stays on the
    terminal.

    The driver's C++ core worker logs to fd 2 directly, below any Python setting: for example an "E" line for
    every Ray Data actor pool (ray-project/ray#57733: constructor arguments in the object store), which is
    advisory. Python's own errors, warnings and tracebacks go through ``sys.stderr``, which is re-opened on
    a copy of the original descriptor first.
    """
    sys.stderr.flush()
    terminal = os.dup(2)
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 2)
    os.close(target)
    log.debug("native stderr of this driver goes to %s", path)


def _keep_on_loopback() -> None:
    """Make the local instance this process is about to start bind 127.0.0.1 only (see the module doc)."""
    os.environ[LOOPBACK_VARIABLE] = "0"
    if _ray_constants is None or not hasattr(_ray_constants, "ENABLE_RAY_CLUSTER"):
        log.warning(
            "this Ray version cannot be held to loopback here; set %s=0 before starting Python", LOOPBACK_VARIABLE
        )
        return
    _ray_constants.ENABLE_RAY_CLUSTER = False


def autoscaler_max_resources() -> dict[str, float]:
    """The largest resources the autoscaler's configuration allows, or ``{}``.

    A private Ray API (``ray._private.state``); any failure, including the API moving in a later Ray, falls
    back to the current cluster resources.
    """
    try:
        return dict(_ray_state.get_max_resources_from_cluster_config() or {})
    except Exception:  # the autoscaler's view is optional; a static cluster has none
        log.debug("no autoscaler configuration; sizing from current cluster resources", exc_info=True)
        return {}


def cluster_capacity() -> dict[str, float]:
    """Resources the cluster has now or can grow to, for sizing pools and concurrency.

    An autoscaling cluster (``cluster.yaml``: GPU workers from 0) has no GPU when a job starts; sizing from
    ``ray.cluster_resources()`` alone would refuse the job before the autoscaler could add a node. Ray Train
    sizes itself from the autoscaler's configured maximum in the same way.
    """
    capacity = dict(ray.cluster_resources())
    maximum = autoscaler_max_resources()
    for key, value in maximum.items():
        capacity[key] = max(capacity.get(key, 0.0), float(value))
    return capacity
