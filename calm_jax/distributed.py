"""Multi-process start-up: one `initialize(...)` call before anything touches a device.

JAX's multi-controller runtime runs one Python process per host (or per GPU); every process
runs the same program, feeds its own slice of each batch, and `jax.distributed.initialize`
joins them into one set of global devices. Where the values for that call come from:

  * **flags** (`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, see
    `FLAGS`), else the **environment** (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
    `JAX_PROCESS_ID`), field by field;
  * else **SLURM**, inside an `srun` step (`SLURM_STEP_NUM_TASKS`, `SLURM_PROCID`, the first
    host of the step's node list as coordinator; with several tasks on a node, each task sees
    only GPU `SLURM_LOCALID`);
  * else a **Cloud TPU VM** (libtpu installed and TPU chips present, or GKE's `TPU_WORKER_*`
    variables): `jax.distributed.initialize()` without arguments, which asks the TPU metadata;
  * else, or with `num_processes=1`, a **single process**: nothing to do.

`plan(...)` makes that decision as a pure function of its arguments and an environment (tests
feed it fake SLURM variables); `initialize(...)` carries it out. On CPU (tests, laptops) the
processes exchange data through gloo collectives, which `initialize` switches on.

A process that dies is noticed by the others through the coordination service's heartbeats:
after `heartbeat_timeout_seconds` without one, every other process is terminated with an
error instead of waiting forever in a collective. A SIGTERM (a preemption) stops the training
loop at a step all processes agree on (`Preemption`).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import math
import os
import re
import signal
from typing import Any, Mapping, Sequence

log = logging.getLogger("calm_jax")

# Command-line flags of `python -m calm_jax.train` handled here: flag -> parser.
FLAGS = {
    "coordinator_address": str,
    "num_processes": int,
    "process_id": int,
    "local_device_ids": lambda s: tuple(int(x) for x in s.split(",") if x.strip()),
    "heartbeat_timeout_seconds": int,
    "initialization_timeout_seconds": int,
}
# Environment variables read when the flag is not given.
ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
    "local_device_ids": "JAX_LOCAL_DEVICE_IDS",
    "heartbeat_timeout_seconds": "CALM_HEARTBEAT_TIMEOUT_SECONDS",
}
# SLURM without an explicit port: a port derived from the job id, the same on every task.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `initialize` will do.

    source: "single" (nothing), "tpu" (`jax.distributed.initialize()` asks the TPU runtime),
      "slurm" or "flags" (explicit values; "flags" also covers the JAX_* environment).
    kwargs: the arguments for `jax.distributed.initialize`.
    """

    source: str
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0
    local_device_ids: tuple[int, ...] | None = None
    heartbeat_timeout_seconds: int | None = None
    initialization_timeout_seconds: int | None = None

    @property
    def multi_process(self) -> bool:
        return self.source == "tpu" or self.num_processes > 1

    @property
    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.source in ("slurm", "flags"):
            out.update(coordinator_address=self.coordinator_address,
                       num_processes=self.num_processes, process_id=self.process_id)
        if self.local_device_ids is not None:
            out["local_device_ids"] = list(self.local_device_ids)
        if self.heartbeat_timeout_seconds is not None:
            out["heartbeat_timeout_seconds"] = self.heartbeat_timeout_seconds
        if self.initialization_timeout_seconds is not None:
            out["initialization_timeout"] = self.initialization_timeout_seconds
        return out

    def describe(self) -> str:
        if self.source == "single":
            return "single process"
        if self.source == "tpu":
            return "Cloud TPU: process count, id and coordinator from the TPU runtime"
        devices = ("" if self.local_device_ids is None
                   else f", local devices {self.local_device_ids}")
        return (f"process {self.process_id} of {self.num_processes}, coordinator "
                f"{self.coordinator_address} (from {self.source}){devices}")


def split_flags(args: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Command-line arguments -> ({flag: parsed value} for `FLAGS`, the other arguments).

    Accepts `--flag=value` and `--flag value`.
    """
    found: dict[str, Any] = {}
    rest: list[str] = []
    args = list(args)
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name not in FLAGS:
            rest.append(arg)
            i += 1
            continue
        if not eq:
            if i + 1 >= len(args):
                raise ValueError(f"--{name}: expected a value, got none")
            value, i = args[i + 1], i + 1
        found[name] = _parse(name, value, f"--{name}")
        i += 1
    return found, rest


def _parse(name: str, value: Any, where: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return FLAGS[name](value)
    except ValueError:
        raise ValueError(f"{where}: expected {_expected(name)}, got {value!r}") from None


def _expected(name: str) -> str:
    return {"coordinator_address": "HOST:PORT",
            "local_device_ids": "comma-separated device ids, e.g. 0,1"}.get(
        name, "an integer")


def plan(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, *, local_device_ids: Sequence[int] | None = None,
         heartbeat_timeout_seconds: int | None = None,
         initialization_timeout_seconds: int | None = None,
         environ: Mapping[str, str] | None = None) -> Plan:
    """Decides how this process joins the job (see the module docstring); raises ValueError
    naming the flag or variable for incomplete or inconsistent values."""
    env = os.environ if environ is None else environ
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id, "local_device_ids": local_device_ids,
             "heartbeat_timeout_seconds": heartbeat_timeout_seconds}
    values, where = {}, {}
    for name, value in given.items():
        if value is not None:
            values[name], where[name] = _parse(name, value, f"--{name}"), f"--{name}"
        elif env.get(ENV[name], "").strip():
            values[name] = _parse(name, env[ENV[name]].strip(), ENV[name])
            where[name] = ENV[name]
    timeouts = dict(heartbeat_timeout_seconds=values.pop("heartbeat_timeout_seconds", None),
                    initialization_timeout_seconds=initialization_timeout_seconds)
    for name, value in timeouts.items():
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"{where.get(name, '--' + name)}: expected a positive number of "
                             f"seconds, got {value!r}")
    if values.get("local_device_ids") is not None:
        values["local_device_ids"] = tuple(int(x) for x in values["local_device_ids"])

    source = "flags"
    slurm = _slurm(env)
    if slurm is not None and values.get("num_processes", slurm["num_processes"]) > 1:
        for name, value in slurm.items():
            if name not in values and value is not None:
                values[name], where[name] = value, "SLURM"
        source = "slurm" if "SLURM" in where.values() else "flags"
    elif not values.get("coordinator_address") and "num_processes" not in values and _on_tpu(env):
        return Plan("tpu", local_device_ids=values.get("local_device_ids"), **timeouts)

    n = values.get("num_processes")
    if n is None:
        if values.get("coordinator_address") or values.get("process_id") is not None:
            given_name = "coordinator_address" if values.get("coordinator_address") else \
                "process_id"
            raise ValueError(f"--num_processes: expected the number of processes since "
                             f"{where[given_name]} is set, got none (flag or "
                             f"{ENV['num_processes']})")
        return Plan("single", **timeouts)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{where['num_processes']}: expected a positive integer, got {n!r}")
    if n == 1:
        return Plan("single", **timeouts)
    address = values.get("coordinator_address")
    if not address:
        raise ValueError(f"--coordinator_address: expected HOST:PORT of process 0 for a run of "
                         f"{n} processes (flag, {ENV['coordinator_address']} or SLURM), "
                         f"got none")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{where['coordinator_address']}: expected HOST:PORT with a port in "
                         f"1..65535, got {address!r}")
    pid = values.get("process_id")
    if pid is None:
        raise ValueError(f"--process_id: expected this process's index in 0..{n - 1} for a run "
                         f"of {n} processes (flag, {ENV['process_id']} or SLURM), got none")
    if not isinstance(pid, int) or not 0 <= pid < n:
        raise ValueError(f"{where['process_id']}: expected an index in 0..{n - 1} "
                         f"({where['num_processes']}={n}), got {pid!r}")
    return Plan(source, address, n, pid, values.get("local_device_ids"), **timeouts)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: Sequence[int] | None = None,
               heartbeat_timeout_seconds: int | None = None,
               initialization_timeout_seconds: int | None = None,
               environ: Mapping[str, str] | None = None) -> Plan:
    """Joins this process to a multi-process job, or does nothing for a single process.

    Must run before the first JAX computation (or `jax.devices()`). Calling it again once
    initialised is a no-op. Returns the `Plan` it carried out.
    """
    import jax

    p = plan(coordinator_address, num_processes, process_id, local_device_ids=local_device_ids,
             heartbeat_timeout_seconds=heartbeat_timeout_seconds,
             initialization_timeout_seconds=initialization_timeout_seconds, environ=environ)
    if not p.multi_process:
        return p
    if jax.distributed.is_initialized():
        log.info("distributed: already initialised (%d processes)", jax.process_count())
        return p
    _enable_cpu_collectives(jax)
    log.info("distributed: %s", p.describe())
    try:
        jax.distributed.initialize(**p.kwargs)
    except RuntimeError as e:
        if "before any JAX" in str(e) or "backend" in str(e):
            raise RuntimeError(f"calm_jax.distributed.initialize: must run before the first JAX "
                               f"computation or jax.devices() call ({e})") from e
        raise
    log.info("distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return p


def _enable_cpu_collectives(jax) -> None:
    """Cross-process collectives for the CPU backend (gloo), unless the user picked one."""
    try:
        current = jax.config.jax_cpu_collectives_implementation
    except AttributeError:  # a jax without the option: nothing to choose
        return
    if current in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


# --- environments -------------------------------------------------------------------------


def _slurm(env: Mapping[str, str]) -> dict[str, Any] | None:
    """Process count, id, coordinator and local devices of an `srun` task (None: not one).

    Only a task of a job step counts (srun sets `SLURM_STEP_*`); the batch script itself, or an
    interactive shell in an allocation, stays a single process.
    """
    if not all(env.get(k) for k in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS")):
        return None
    ntasks = int(env["SLURM_STEP_NUM_TASKS"])
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    port = env.get("JAX_COORDINATOR_PORT") or str(
        SLURM_PORT_BASE + int(re.sub(r"\D", "", env["SLURM_JOB_ID"]) or 0) % SLURM_PORT_SPAN)
    out: dict[str, Any] = {
        "num_processes": ntasks, "process_id": int(env["SLURM_PROCID"]),
        "coordinator_address": f"{first_host(nodelist)}:{port}" if nodelist else None,
        "local_device_ids": None}
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
    visible = [x for x in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    if ntasks > nodes and env.get("SLURM_LOCALID") and len(visible) != 1:
        # Several tasks per node, each seeing every GPU: one GPU per task.
        out["local_device_ids"] = (int(env["SLURM_LOCALID"]),)
    return out


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list -> host names: 'gpu[01-03,07],login1' ->
    ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login1']. Zero padding is kept."""
    hosts: list[str] = []
    for item in _split_top_level(hostlist):
        expanded = [""]
        for literal, ranges in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", item):
            choices = [literal]
            if ranges:
                choices = [literal + n for n in _expand_ranges(ranges, hostlist)]
            expanded = [e + c for e in expanded for c in choices]
        hosts.extend(h for h in expanded if h)
    return hosts


def first_host(hostlist: str) -> str:
    hosts = expand_hostlist(hostlist)
    if not hosts:
        raise ValueError(f"SLURM_JOB_NODELIST: expected at least one host, got {hostlist!r}")
    return hosts[0]


def _split_top_level(hostlist: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in hostlist.strip():
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    return [i for i in items + [current] if i]


def _expand_ranges(ranges: str, hostlist: str) -> list[str]:
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"SLURM_JOB_NODELIST: cannot read the range {part!r} in "
                             f"{hostlist!r}")
        width = len(lo)
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi or lo) + 1))
    return out


def _on_tpu(env: Mapping[str, str]) -> bool:
    """A Cloud TPU VM (libtpu + TPU chips) or a GKE TPU pod (TPU_WORKER_* variables)."""
    if env.get("JAX_PLATFORMS", "").split(",")[0] not in ("", "tpu"):
        return False
    if env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES"):
        return True
    chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(chips) and importlib.util.find_spec("libtpu") is not None


# --- data layout --------------------------------------------------------------------------


def check_process_batch_layout(sharding, batch_size: int, what: str = "dataset") -> None:
    """Checks that each process owns its own `batch_size / process_count` rows of a batch.

    Every process reads only its slice of each global batch (`calm_jax.data.NumpySource`), so
    the batch axis must be split over processes, not replicated across them: a mesh whose
    data-parallel axes stay inside one process (e.g. `mesh_shape=(1, 1, -1)` over two hosts)
    would silently assemble a batch from different rows on each host. Raises ValueError.
    """
    import jax

    if jax.process_count() == 1:
        return
    rows: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map((batch_size,)).items():
        rows.setdefault(device.process_index, set()).update(
            range(*index[0].indices(batch_size)))
    local = batch_size // jax.process_count()
    owned = [len(r) for r in rows.values()]
    if len(rows) != jax.process_count() or set(owned) != {local} or sum(owned) != batch_size:
        dp = math.prod(sharding.mesh.shape[a] for a in ("data", "fsdp")
                       if a in sharding.mesh.shape)
        raise ValueError(
            f"partitioning.mesh_shape: expected the batch axes (data x fsdp = {dp}) to "
            f"split {what}.batch_size={batch_size} over all {jax.process_count()} processes "
            f"({local} rows each), got rows per process {sorted(owned)}; make data x fsdp a "
            f"multiple of the process count and keep tensor parallelism inside a host")


class Preemption:
    """Turns SIGTERM into a flag the loop checks after every step.

    With several processes the stop must happen at the same step everywhere (the checkpoint
    save is collective), so the handler is left to JAX's preemption service, which spreads a
    SIGTERM seen by any process and agrees on a step (`should_stop`).
    """

    def __init__(self):
        import jax

        self.requested = False
        self._previous = None
        self._multi_process = jax.process_count() > 1

    def __enter__(self):
        if self._multi_process:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler
            self._previous = None
        return self

    def should_stop(self, step: int) -> bool:
        if self._multi_process:
            from jax.experimental import multihost_utils
            self.requested = self.requested or multihost_utils.reached_preemption_sync_point(
                step)
        return self.requested

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint and stopping")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
