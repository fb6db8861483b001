"""Launch scripts: the commands their --dry-run prints (TPU slices, SLURM, ssh, local), and the
quoting of those commands run end to end through stand-in ssh / srun / python programs."""

import json
import os
import shlex
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN = ["--gin_file=experiments/compose_kv.gin", "--gin.MODEL_DIR='/shared/runs/calm'",
       "--gin.NUM_STEPS=300"]


def _script(name, *args, env=None, check=True):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", name), *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _commands(stdout):
    """Printed command lines (comments dropped, a trailing ' &' removed) as argv lists."""
    out = []
    for line in stdout.splitlines():
        if line and not line.startswith("#") and line != "wait":
            out.append(shlex.split(line[:-2] if line.endswith(" &") else line))
    return out


def _flag(cmd, name):
    return next(a.split("=", 1)[1] for a in cmd if a.startswith(name + "="))


# --- TPU pods ------------------------------------------------------------------------------


@pytest.mark.parametrize("accelerator, gcloud_type, workers, version", [
    ("v4-32", "v4-32", 4, "tpu-ubuntu2204-base"),
    ("v5e-256", "v5litepod-256", 64, "v2-alpha-tpuv5-lite"),
])
def test_tpu_pod_dry_run(accelerator, gcloud_type, workers, version):
    out = _script("tpu_pod.py", "--name=calm", "--zone=us-central2-b", "--project=proj",
                  f"--accelerator_type={accelerator}", "--dry-run", "--", *GIN).stdout
    assert f"# slice calm: {gcloud_type}, {workers} worker(s)" in out
    cmds = _commands(out)
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    assert all(c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] for c in gcloud)
    assert all("--zone=us-central2-b" in c and "--project=proj" in c for c in gcloud)
    verbs = [c[4] for c in gcloud]
    assert verbs == ["describe", "create", "scp", "ssh", "ssh"] + ["ssh"] * workers
    create = gcloud[1]
    assert f"--accelerator-type={gcloud_type}" in create and f"--version={version}" in create
    assert "delete" not in verbs  # only on request

    scp, install, start = gcloud[2], gcloud[3], gcloud[4]
    assert "--worker=all" in scp and "calm:calm_jax.tar.gz" in scp
    assert "--worker=all" in install and "pip install -q -e ." in _flag(install, "--command")
    assert "jax[tpu]" in _flag(install, "--command")
    assert "--worker=all" in start
    # The training command as each worker's shell will see it: gin file and bindings intact.
    remote = _flag(start, "--command")
    inner = shlex.split(remote)[shlex.split(remote).index("-c") + 1]
    train = shlex.split(inner.split("&&", 1)[1].split(";")[0])
    assert train == ["python3", "-m", "calm_jax.train", *GIN]
    # One log stream per worker.
    streams = gcloud[5:]
    assert [_flag(c, "--worker") for c in streams] == [str(w) for w in range(workers)]
    assert all("tail -n +1 -F calm_jax_run.log" in _flag(c, "--command") for c in streams)


def test_tpu_pod_packs_the_gin_configs(tmp_path):
    """The archive copied to the workers keeps gin/runs/ (only the top-level runs/ is left out)."""
    out = _script("tpu_pod.py", "--name=calm", "--zone=z", "--accelerator_type=v4-8",
                  "--dry-run", "--", *GIN).stdout
    tar = next(c for c in _commands(out) if c[0] == "tar")
    archive = tmp_path / "code.tar.gz"
    tar[tar.index("-czf") + 1] = str(archive)
    subprocess.run(tar, check=True, timeout=60)
    names = subprocess.run(["tar", "-tzf", str(archive)], capture_output=True, text=True,
                           check=True).stdout.split()
    assert "./gin/runs/base.gin" in names and "./calm_jax/train.py" in names
    assert not any(n.startswith(("./.git/", "./runs/")) for n in names)


def test_tpu_pod_teardown():
    out = _script("tpu_pod.py", "--name=calm", "--zone=z", "--teardown", "--dry-run").stdout
    assert _commands(out) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "calm",
                               "--quiet", "--zone=z"]]
    out = _script("tpu_pod.py", "--name=calm", "--zone=z", "--accelerator_type=v4-8",
                  "--teardown_after_run", "--log_workers=0", "--skip_install", "--dry-run",
                  "--", *GIN).stdout
    verbs = [c[4] for c in _commands(out) if c[0] == "gcloud"]
    assert verbs == ["describe", "create", "ssh", "ssh", "delete"]


@pytest.mark.parametrize("args, message", [
    (["--accelerator_type=v9-8"], "--accelerator_type: expected <generation>-<size>"),
    (["--accelerator_type=v4-12"], "--accelerator_type: expected a v4 size that is a multiple "
                                   "of 8 cores (one host), got 12"),
    (["--accelerator_type=v4-32", "--log_workers=4"],
     "--log_workers: expected 'all' or worker ids in 0..3, got '4'"),
])
def test_tpu_pod_bad_flags(args, message):
    proc = _script("tpu_pod.py", "--name=calm", "--zone=z", *args, "--dry-run", "--", *GIN,
                   check=False)
    assert proc.returncode == 2 and message in proc.stderr


def test_tpu_slice_shapes():
    sys.path.insert(0, os.path.join(REPO, "launch"))
    try:
        import tpu_pod
    finally:
        sys.path.pop(0)
    assert tpu_pod.slice_shape("v4-8")[:2] == ("v4-8", 1)
    assert tpu_pod.slice_shape("v5p-128")[:2] == ("v5p-128", 16)
    assert tpu_pod.slice_shape("v5litepod-16")[:2] == ("v5litepod-16", 4)
    assert tpu_pod.slice_shape("v5e-8")[:2] == ("v5litepod-8", 1)
    assert tpu_pod.slice_shape("v6e-256")[:2] == ("v6e-256", 64)
    assert tpu_pod.slice_shape("v3-32")[:2] == ("v3-32", 4)


# --- GPU clusters --------------------------------------------------------------------------


def _stand_ins(tmp_path):
    """A fake python that prints its argv and SLURM task id as JSON; fake ssh / srun /
    scontrol that run locally. Returns the bin directory."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    files = {
        "python": f"#!{sys.executable}\nimport json, os, sys\n"
                  "print(json.dumps({'argv': sys.argv[1:], "
                  "'procid': os.environ.get('SLURM_PROCID')}))\n"
                  "sys.exit(int(os.environ.get('FAIL_EXIT', '0')) if '--process_id=1' in "
                  "sys.argv else 0)\n",
        # ssh [-o X]... [-tt] HOST COMMAND: run COMMAND here.
        "ssh": '#!/bin/sh\nfor last; do :; done\nexec bash -c "$last"\n',
        # srun [--options] PROGRAM...: two tasks, SLURM_PROCID 0 and 1.
        "srun": '#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\n'
                'for i in 0 1; do SLURM_PROCID=$i SLURM_LOCALID=0 "$@" || exit $?; done\n',
        "scontrol": '#!/bin/sh\nprintf "node007\\nnode008\\n"\n',
    }
    for name, text in files.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def test_slurm_two_nodes_script(tmp_path):
    script = tmp_path / "job.sbatch"
    proc = _script("slurm_gpu.py", "--nodes=2", "--gpus_per_node=8", "--partition=gpu",
                   "--port=23456", f"--output={script}", f"--workdir={tmp_path}",
                   f"--python={tmp_path / 'bin' / 'python'}", "--setup=module load cuda",
                   "--dry-run", "--", *GIN)
    out = proc.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "module load cuda",
                 'COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
                 ':23456"'):
        assert line in out.splitlines(), line
    assert out.splitlines()[-1] == f"sbatch {script}"
    assert "srun --kill-on-bad-exit=1" in out and "--num_processes=2" in out
    assert '--process_id="$SLURM_PROCID"' in out and "--local_device_ids" not in out

    # Run the script with stand-ins for srun/scontrol/python: two tasks, ids 0 and 1.
    bin_dir = _stand_ins(tmp_path)
    body = out.split(" batch script (" + str(script) + "):\n", 1)[1].rsplit("\nsbatch", 1)[0]
    script.write_text(body.replace("module load cuda\n", ""))
    run = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                              "SLURM_JOB_NODELIST": "node[007-008]", "SLURM_NTASKS": "2"})
    assert run.returncode == 0, run.stderr
    tasks = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [t["procid"] for t in tasks] == ["0", "1"]
    for i, task in enumerate(tasks):
        assert task["argv"] == ["-m", "calm_jax.train", *GIN, "--num_processes=2",
                                "--coordinator_address=node007:23456", f"--process_id={i}"]


def test_slurm_one_process_per_gpu():
    out = _script("slurm_gpu.py", "--nodes=2", "--gpus_per_node=4", "--per=gpu", "--dry-run",
                  "--", *GIN).stdout
    assert "#SBATCH --ntasks-per-node=4" in out and "--num_processes=8" in out
    assert '--local_device_ids="$SLURM_LOCALID"' in out


def test_gpu_ssh_two_hosts_dry_run():
    out = _script("gpu_ssh.py", "--hosts=gpu1,gpu2", "--port=23456", "--workdir=/shared/calm",
                  "--sync", "--dry-run", "--", *GIN).stdout
    cmds = _commands(out)
    syncs, runs = cmds[:4], cmds[4:]
    assert [c[0] for c in syncs] == ["rsync", "ssh", "rsync", "ssh"]
    assert syncs[0][-1] == "gpu1:/shared/calm/" and "pip install -q -e ." in syncs[1][-1]
    assert len(runs) == 2
    for i, (cmd, host) in enumerate(zip(runs, ["gpu1", "gpu2"])):
        assert cmd[:2] == ["ssh", "-o"] and "-tt" in cmd and cmd[-2] == host
        cd, train = cmd[-1].split(" && exec ")
        assert cd == "cd /shared/calm"
        assert shlex.split(train) == ["python3", "-m", "calm_jax.train", *GIN,
                                      "--coordinator_address=gpu1:23456", "--num_processes=2",
                                      f"--process_id={i}"]


def test_gpu_ssh_runs_both_processes_and_fails_with_the_failing_one(tmp_path):
    bin_dir = _stand_ins(tmp_path)
    args = ["--hosts=gpu1,gpu2", f"--ssh={bin_dir / 'ssh'}", f"--workdir={tmp_path}",
            f"--python={bin_dir / 'python'}", "--grace_seconds=5", f"--log_dir={tmp_path}/logs",
            "--", *GIN]
    proc = _script("gpu_ssh.py", *args)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("[gpu")]
    got = {l.split("] ", 1)[0][1:]: json.loads(l.split("] ", 1)[1]) for l in lines}
    assert sorted(got) == ["gpu1 process 0", "gpu2 process 1"]
    assert got["gpu2 process 1"]["argv"][-3:] == [
        "--coordinator_address=gpu1:29500", "--num_processes=2", "--process_id=1"]
    assert sorted(os.listdir(tmp_path / "logs")) == ["gpu1_process_0.log", "gpu2_process_1.log"]

    proc = _script("gpu_ssh.py", *args, env={"FAIL_EXIT": "3"}, check=False)
    assert proc.returncode == 3
    assert "[launcher] job failed: gpu2 process 1 exited with status 3" in proc.stdout


# --- local ---------------------------------------------------------------------------------


def test_local_multiprocess_dry_run():
    out = _script("local_multiprocess.py", "--num_processes=2", "--devices_per_process=4",
                  "--port=23456", "--dry-run", "--", *GIN).stdout
    cmds = _commands(out)
    assert len(cmds) == 2
    for i, cmd in enumerate(cmds):
        env = dict(a.split("=", 1) for a in cmd if a.split("=", 1)[0] in
                   ("JAX_PLATFORMS", "XLA_FLAGS", "PYTHONPATH"))
        assert env["JAX_PLATFORMS"] == "cpu"
        assert env["XLA_FLAGS"].split()[-1] == "--xla_force_host_platform_device_count=4"
        train = cmd[cmd.index("-m"):]
        assert train == ["-m", "calm_jax.train", *GIN, "--coordinator_address=localhost:23456",
                         "--num_processes=2", f"--process_id={i}",
                         "--heartbeat_timeout_seconds=20"]


def test_process_group_reports_every_failure_and_exits_with_the_first(tmp_path):
    """One process is killed; a second one fails because of it (as JAX's peers abort when a
    collective loses a process). Both are reported; the job's status is the killed one's."""
    sys.path.insert(0, os.path.join(REPO, "launch"))
    try:
        import procs
    finally:
        sys.path.pop(0)
    pidfile = tmp_path / "pid"
    killed = f"echo $$ > {pidfile}; sleep 0.3; kill -9 $$"
    # Fails only once the killed process has ended and been reaped, and 0.2 s after that.
    follower = (f"while [ ! -s {pidfile} ]; do sleep 0.01; done; p=$(cat {pidfile}); "
                "while [ -e /proc/$p ]; do sleep 0.01; done; sleep 0.2; echo lost peer; exit 6")
    healthy = "sleep 0.1; echo done"
    out = open(tmp_path / "log", "w+")
    group = procs.ProcessGroup(grace_seconds=30, out=out)
    group.start("follower", ["sh", "-c", follower])  # first in start order
    group.start("killed", ["sh", "-c", killed])
    group.start("healthy", ["sh", "-c", healthy])
    rc = group.wait()
    out.seek(0)
    log = out.read()
    assert rc == 128 + 9, log
    assert "[launcher] killed failed with exit status -9; waiting up to 30 s for the other 1 " \
           "to stop" in log, log
    assert "[launcher] follower failed with exit status 6\n" in log, log
    assert "[follower] lost peer" in log and "[healthy] done" in log
    assert log.rstrip().endswith("[launcher] job failed: killed exited with status -9"), log
    assert "terminating them" not in log
