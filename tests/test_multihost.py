"""Multi-host without hosts: one job as 2 and 4 local CPU processes (jax.distributed + gloo).

A tiny anchor and augmenting model are pretrained once in this process; composition jobs then
run through `launch/local_multiprocess.py` (each child `python -m calm_jax.train` with its own
fake CPU devices) and must reproduce the loss curve of one process with the same global batch
and device count. Killing one process must end the whole job within a bounded time (JAX's
heartbeat), running the command again must resume from the last checkpoint, and a SIGTERM to
one process (a preemption notice) must stop all of them at the same step with a checkpoint.

Also here: `calm_jax.distributed.plan` against fake SLURM / TPU environments and bad flags.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from calm_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "launch", "local_multiprocess.py")
NUM_STEPS = 400   # the schedule's length; every run stops long before it
REF_STEPS = 12    # steps of the single-process reference curve
RTOL = 1e-4


# --- distributed.plan: where the values come from (no processes started) -------------------


def test_single_process_is_a_no_op():
    assert distributed.plan(environ={}).source == "single"
    assert not distributed.plan(environ={}).multi_process
    assert distributed.plan(num_processes=1, environ={}).source == "single"
    assert distributed.initialize(environ={}).source == "single"  # touches nothing


def test_flags_and_environment():
    p = distributed.plan("10.0.0.1:1234", 2, 1, environ={})
    assert (p.source, p.coordinator_address, p.num_processes, p.process_id) == \
        ("flags", "10.0.0.1:1234", 2, 1)
    assert p.kwargs == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                        "process_id": 1}
    env = {"JAX_COORDINATOR_ADDRESS": "h0:99", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    p = distributed.plan(process_id=2, environ=env)  # a flag beats the environment
    assert (p.coordinator_address, p.num_processes, p.process_id) == ("h0:99", 4, 2)
    flags, rest = distributed.split_flags(["--gin.X=1", "--num_processes", "2",
                                           "--process_id=0", "--coordinator_address=a:1",
                                           "--local_device_ids=0,1", "--other"])
    assert flags == {"num_processes": 2, "process_id": 0, "coordinator_address": "a:1",
                     "local_device_ids": (0, 1)}
    assert rest == ["--gin.X=1", "--other"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=2, process_id=0),
     r"--coordinator_address: expected HOST:PORT of process 0 for a run of 2 processes"),
    (dict(coordinator_address="h:1", num_processes=2),
     r"--process_id: expected this process's index in 0..1 for a run of 2 processes"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2),
     r"--process_id: expected an index in 0..1 \(--num_processes=2\), got 2"),
    (dict(coordinator_address="h", num_processes=2, process_id=0),
     r"--coordinator_address: expected HOST:PORT with a port in 1..65535, got 'h'"),
    (dict(coordinator_address="h:1", process_id=0),
     r"--num_processes: expected the number of processes since --coordinator_address is set"),
    (dict(num_processes="two"), r"--num_processes: expected an integer, got 'two'"),
    (dict(num_processes=0), r"--num_processes: expected a positive integer, got 0"),
])
def test_bad_flags_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distributed.plan(environ={}, **kwargs)


def _slurm_env(procid, ntasks=2, nodes=2, **extra):
    """What srun sets in each task."""
    return {"SLURM_JOB_ID": "4242", "SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks),
            "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_STEP_NUM_NODES": str(nodes),
            "SLURM_LOCALID": str(procid % (ntasks // nodes)),
            "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_JOB_NODELIST": "gpu[007-008]", **extra}


def test_slurm_two_nodes():
    plans = [distributed.plan(environ=_slurm_env(i)) for i in (0, 1)]
    port = distributed.SLURM_PORT_BASE + 4242 % distributed.SLURM_PORT_SPAN
    for i, p in enumerate(plans):
        assert (p.source, p.coordinator_address, p.num_processes, p.process_id,
                p.local_device_ids) == ("slurm", f"gpu007:{port}", 2, i, None)
    # The batch script's explicit values win; one task per GPU sees only its own GPU.
    p = distributed.plan(environ=_slurm_env(5, ntasks=8, nodes=2, JAX_COORDINATOR_PORT="555"))
    assert (p.coordinator_address, p.num_processes, p.process_id, p.local_device_ids) == \
        ("gpu007:555", 8, 5, (1,))
    p = distributed.plan(environ=_slurm_env(5, ntasks=8, nodes=2, CUDA_VISIBLE_DEVICES="1"))
    assert p.local_device_ids is None  # SLURM already bound one GPU to the task
    assert distributed.plan(environ=_slurm_env(0, ntasks=1, nodes=1)).source == "single"
    batch_script = {k: v for k, v in _slurm_env(0).items() if not k.startswith("SLURM_STEP")}
    assert distributed.plan(environ=batch_script).source == "single"  # not an srun task


def test_slurm_hostlists():
    assert distributed.expand_hostlist("gpu[01-03,07],login1") == \
        ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert distributed.expand_hostlist("r[1-2]-n[08-09]") == \
        ["r1-n08", "r1-n09", "r2-n08", "r2-n09"]
    assert distributed.first_host("node3,node1") == "node3"
    with pytest.raises(ValueError, match=r"SLURM_JOB_NODELIST: cannot read the range 'a-b'"):
        distributed.expand_hostlist("n[a-b]")


def test_tpu_vm_lets_jax_ask_the_tpu_runtime():
    p = distributed.plan(environ={"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"})
    assert p.source == "tpu" and p.multi_process and p.kwargs == {}
    p = distributed.plan(heartbeat_timeout_seconds=30, environ={"TPU_WORKER_HOSTNAMES": "t0"})
    assert p.kwargs == {"heartbeat_timeout_seconds": 30}
    # An explicit single process, or JAX_PLATFORMS=cpu, keeps a TPU VM single-process.
    assert distributed.plan(num_processes=1, environ={"TPU_WORKER_HOSTNAMES": "t0"}).source == \
        "single"
    assert distributed.plan(environ={"TPU_WORKER_HOSTNAMES": "t0",
                                     "JAX_PLATFORMS": "cpu"}).source == "single"


# --- real processes -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Pretrains the anchor (numbers) and augmenting model (keys) for two steps, in process."""
    from calm_jax import train as train_cli

    root = tmp_path_factory.mktemp("pretrain")
    out = {}
    for name, gin_file in (("anchor", "experiments/pretrain_numeric.gin"),
                           ("augment", "experiments/pretrain_kv.gin")):
        train_cli.run([f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{root / name}'",
                       "--gin.NUM_STEPS=2", "--gin.BATCH_SIZE=8",
                       "--gin.trainer.train.eval_every=0"])
        out[name] = str(root / name / "export")
    return out


def _compose_args(model_dir, exports, *extra):
    return ["--gin_file=experiments/compose_kv.gin", f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.ANCHOR_CHECKPOINT='{exports['anchor']}'",
            f"--gin.AUGMENT_CHECKPOINT='{exports['augment']}'",
            f"--gin.NUM_STEPS={NUM_STEPS}", "--gin.BATCH_SIZE=8",
            "--gin.trainer.train.log_every=1", "--gin.trainer.train.eval_every=0", *extra]


@pytest.fixture(scope="module")
def reference(exports, tmp_path_factory):
    """Losses of steps 1..REF_STEPS in one process on 4 devices (the multi-process runs have 4
    devices in all, so the reductions have the same shape)."""
    from calm_jax import train as train_cli

    model_dir = tmp_path_factory.mktemp("reference")
    result = train_cli.run(_compose_args(
        model_dir, exports, f"--gin.trainer.train.stop_after={REF_STEPS}",
        "--gin.partitioning.PartitioningConfig.num_devices=4"))
    return {step: m["loss"] for step, m in result["history"]}


def _start(num_processes, devices, train_args, out_path, heartbeat=20, grace=None):
    cmd = [sys.executable, LAUNCHER, f"--num_processes={num_processes}",
           f"--devices_per_process={devices}", f"--heartbeat_timeout_seconds={heartbeat}"]
    if grace is not None:
        cmd.append(f"--grace_seconds={grace}")
    out = open(out_path, "w")
    # Own session: whatever happens, the finaliser below can end the launcher and its children.
    return subprocess.Popen(cmd + ["--", *train_args], cwd=REPO, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc, timeout):
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _launch(num_processes, devices, train_args, tmp_path, timeout=150, **kw):
    log = tmp_path / f"launch_{num_processes}.log"
    rc = _finish(_start(num_processes, devices, train_args, log, **kw), timeout)
    return rc, log.read_text()


def _losses(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("num_processes, devices, steps", [(2, 2, 6), (4, 1, 3)])
def test_processes_match_one_process(tmp_path, exports, reference, num_processes, devices,
                                     steps):
    model_dir = tmp_path / "calm"
    rc, log = _launch(num_processes, devices, _compose_args(
        model_dir, exports, f"--gin.trainer.train.stop_after={steps}"), tmp_path)
    assert rc == 0, log[-3000:]
    for i in range(num_processes):
        assert f"[process_{i}] " in log and f"process {i} of {num_processes}" in log
    assert f"{devices} local / 4 global devices" in log
    got = _losses(model_dir)  # process 0 alone writes metrics: one line per step
    assert [s for s, _ in got] == list(range(1, steps + 1))
    np.testing.assert_allclose([l for _, l in got], [reference[s] for s, _ in got], rtol=RTOL)
    assert os.path.isdir(model_dir / "checkpoints" / str(steps))


def _wait_until(proc, out, done, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, out.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.05)
    return {int(n): int(p) for n, p in
            re.findall(r"\[launcher\] process_(\d): pid (\d+)", out.read_text())}


def test_killed_process_fails_the_job_and_a_restart_resumes(tmp_path, exports, reference):
    model_dir = tmp_path / "calm"
    ckpt_dir = model_dir / "checkpoints"
    heartbeat = 8
    args = _compose_args(model_dir, exports, "--gin.checkpoints.CheckpointConfig.save_every=2",
                         "--gin.checkpoints.CheckpointConfig.keep=3")
    out = tmp_path / "killed.log"
    proc = _start(2, 2, args, out, heartbeat=heartbeat, grace=heartbeat + 20)
    try:
        pids = _wait_until(proc, out, (ckpt_dir / "2").is_dir, "checkpoint 2")
        os.kill(pids[1], signal.SIGKILL)
        rc = proc.wait(timeout=heartbeat + 60)
    finally:
        _finish(proc, timeout=0)
    log = out.read_text()
    assert rc != 0, log[-3000:]
    # Every failure is reported, in the order they happened: process 0 may abort within
    # milliseconds of the kill (its collective lost a peer) or after JAX's heartbeat timeout.
    assert "[launcher] process_1 failed with exit status -9" in log, log[-3000:]
    # Process 0 stopped on its own, within the launcher's grace period (heartbeat + 20 s):
    # past it the launcher would have said it was terminating it.
    assert "terminating them" not in log, log[-3000:]
    assert not any(_alive(p) for p in pids.values())

    # The same command again resumes; a SIGTERM to one process (a preemption notice) stops
    # both at the same step with a checkpoint, and the job ends cleanly.
    last = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    assert last + 1 <= REF_STEPS, f"the job got to step {last} before the kill"
    out = tmp_path / "resumed.log"
    proc = _start(2, 2, args, out, heartbeat=heartbeat)
    try:
        pids = _wait_until(proc, out, lambda: f" step {last + 1}/{NUM_STEPS} " in out.read_text(),
                           f"step {last + 1}")
        os.kill(pids[1], signal.SIGTERM)
        rc = _finish(proc, timeout=60)
    finally:
        _finish(proc, timeout=0)
    log = out.read_text()
    assert rc == 0, log[-3000:]
    assert f"restored step {last} from {ckpt_dir}" in log
    stopped = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    assert stopped > last
    assert log.count(f"done: {stopped - last} steps") == 2  # both stopped at that step
    resumed = [(s, l) for s, l in _losses(model_dir)[-(stopped - last):] if s <= REF_STEPS]
    assert resumed[0][0] == last + 1
    np.testing.assert_allclose([l for _, l in resumed], [reference[s] for s, _ in resumed],
                               rtol=RTOL)


def test_batch_replicated_across_processes_is_refused(tmp_path, exports):
    """Tensor parallelism over both processes would give each its own half batch silently."""
    rc, log = _launch(2, 1, _compose_args(
        tmp_path / "calm", exports, "--gin.partitioning.PartitioningConfig.mesh_shape=(1,1,2)",
        "--gin.trainer.train.stop_after=1"), tmp_path)
    assert rc != 0
    assert ("partitioning.mesh_shape: expected the batch axes (data x fsdp = 1) to "
            "split dataset.batch_size=8 over all 2 processes (4 rows each), got rows per "
            "process [8, 8]") in log
