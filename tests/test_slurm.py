"""The launchers under a real SLURM: munged, slurmctld and slurmd on localhost with a one-node CPU cluster.

.ci/run installs Debian's slurm-wlm and munge when they are missing; elsewhere these tests skip and say
how to get them. The daemons run as root from a temporary folder and are stopped when the module ends,
whatever happened.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_conf(folder, host: str) -> str:
    return f"""ClusterName=musicpt-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
KillWait=30
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def start_munge() -> bool:
    """Starts munged unless one answers already; returns whether this test started it."""
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return False
    os.makedirs("/run/munge", exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], check=True)
    return True


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [name for name in ("munged", "slurmctld", "slurmd", "sbatch")
               if not shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin")]
    if missing:
        pytest.skip(f"SLURM is not installed (no {', '.join(missing)}); .ci/run installs it: "
                    "apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("this test runs slurmctld and slurmd as root, on localhost")
    folder = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        os.makedirs(folder / sub)
    host = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, host))
    env = {**os.environ, "SLURM_CONF": str(conf), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PATH": os.environ.get("PATH", "") + ":/usr/sbin"}
    started_munge, daemons = start_munge(), []
    try:
        for daemon in (["slurmctld", "-D", "-c", "-i"], ["slurmd", "-D"]):
            log = open(folder / f"{daemon[0]}.out", "w")
            daemons.append(subprocess.Popen(daemon + ["-f", str(conf)], env=env, stdout=log, stderr=log,
                                            start_new_session=True))
        deadline = time.time() + 60
        while "idle" not in sh(["sinfo", "-h", "-o", "%T"], env, check=False):
            assert time.time() < deadline, f"the SLURM node never became idle; see {folder}"
            time.sleep(0.5)
        yield env
    finally:
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True)
        for daemon in daemons:
            daemon.send_signal(signal.SIGTERM)
        for daemon in daemons:
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
        if started_munge:
            with open("/run/munge/munged.pid") as pid:
                os.kill(int(pid.read()), signal.SIGTERM)


def sh(cmd: list[str], env: dict, check: bool = True) -> str:
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if check and done.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    return done.stdout


def submitted_job(output: str) -> str:
    return re.search(r"submitted (?:array )?job (\d+)", output).group(1)


def wait_until(condition, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def job_done(job: str, env: dict) -> bool:
    return not sh(["squeue", "-h", "-j", job], env, check=False).strip()


def logged_steps(run_dir) -> list[int]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as file:
        rows = [json.loads(line) for line in file if line.strip()]
    return [row["step"] for row in rows if "loss" in row]  # training rows (eval/ and collapse/ rows share their step)


def submit_pretrain(slurm, train_data, run_root, name: str, *extra) -> tuple[str, str]:
    shards, labels = train_data
    env = {**slurm, "RUN_ROOT": str(run_root), "JOB_NAME": name, "TASKS_PER_NODE": "2", "CPUS_PER_TASK": "1",
           "PYTHON": sys.executable}
    out = sh(["bash", "launch/slurm_pretrain.sh", "tiny", f"data.shards={shards}", f"data.labels=[{labels}]",
              "data.crop_seconds=1.0", "data.batch_size=2", "data.shuffle_buffer=8", *extra], env)
    return submitted_job(out), os.path.join(run_root, name)


def test_pretrain_job_runs_two_ranks_and_leaves_a_checkpoint(slurm, train_data, tmp_path):
    job, run_dir = submit_pretrain(slurm, train_data, tmp_path, "once", "train.steps=12", "train.save_every=6",
                                   "train.log_every=3", "train.log_samples=true")
    wait_until(lambda: job_done(job, slurm), f"job {job}")
    log = open(os.path.join(run_dir, f"slurm-{job}.out")).read()
    status = json.load(open(os.path.join(run_dir, "status.json")))
    assert status == {**status, "state": "finished", "step": 12}, log[-3000:]
    assert "2 task(s)" in log and "2 process(es)" in log
    for rank in (0, 1):  # both ranks trained every step
        with open(os.path.join(run_dir, "samples", f"rank-{rank:05d}.jsonl")) as file:
            assert [json.loads(line)["step"] for line in file] == list(range(1, 13))
    assert json.load(open(os.path.join(run_dir, "checkpoints", "step-00000012", "complete.json")))["world"] == 2


def test_time_limit_signal_and_requeue_resume_from_checkpoints(slurm, train_data, tmp_path):
    job, run_dir = submit_pretrain(slurm, train_data, tmp_path, "requeued", "train.steps=300", "train.save_every=100",
                                   "train.log_every=5")
    log_path = os.path.join(run_dir, f"slurm-{job}.out")
    wait_until(lambda: max(logged_steps(run_dir), default=0) >= 20, "step 20")
    sh(["scancel", "--batch", "--signal=USR1", job], slurm)  # what --signal=B:USR1@... sends before the time limit
    wait_until(lambda: "resumed from" in open(log_path).read(), "the self-requeued job to resume")
    first = int(re.findall(r"resumed from \S+ \(step (\d+)", open(log_path).read())[0])
    wait_until(lambda: max(logged_steps(run_dir), default=0) >= first + 20, f"step {first + 20}")
    sh(["scontrol", "requeue", job], slurm)  # an administrator's or the scheduler's requeue: SIGTERM, then again
    wait_until(lambda: job_done(job, slurm), f"job {job} to finish")
    log = open(log_path).read()
    resumed = [int(step) for step in re.findall(r"resumed from \S+ \(step (\d+)", log)]
    assert "restart 1" in log and "restart 2" in log, log[-3000:]
    assert len(resumed) == 2 and 20 <= resumed[0] < resumed[1] < 300  # each time from the checkpoint saved on the signal
    assert "requeueing job" in log  # the USR1 path requeued itself
    steps = logged_steps(run_dir)
    assert steps == list(range(5, 301, 5))  # logged once each: nothing redone twice, nothing from zero
    assert json.load(open(os.path.join(run_dir, "status.json")))["state"] == "finished"


def test_teacher_array_job_labels_every_shard_exactly_once(slurm, train_data, tmp_path):
    shards, _ = train_data
    labels = tmp_path / "labels"
    config = tmp_path / "kmeans.yaml"
    config.write_text(f"""name: logmel_chroma
shards: {shards}
out: {os.path.join(os.path.dirname(shards), 'kmeans')}
labels: {labels}
streams:
  - {{name: logmel, k: 16, features: {{kind: logmel, n_mels: 64}}}}
  - {{name: chroma, k: 8, features: {{kind: chroma}}}}
max_frames: 2000
""")
    env = {**slurm, "PYTHON": sys.executable}
    out = sh(["bash", "launch/slurm_teachers.sh", "kmeans", "--world", "3", "--cpus-per-task", "1",
              "--log-dir", str(tmp_path / "logs"), "--", "--config", str(config)], env)
    job = submitted_job(out)
    wait_until(lambda: job_done(job, slurm), f"array job {job}")
    index = json.load(open(os.path.join(shards, "index.json")))
    done = {}
    for task in range(3):
        text = open(tmp_path / "logs" / f"teachers-kmeans-{job}_{task}.out").read()
        rank, world, labelled = re.search(r"rank (\d+)/(\d+) -> .*: \d+ shards, (\d+) labelled now", text).groups()
        assert int(world) == 3
        done[int(rank)] = int(labelled)
    assert sorted(done) == [0, 1, 2] and sum(done.values()) == len(index["shards"])
    assert len(list(labels.glob("shard-*.npz"))) == len(index["shards"])
    assert json.load(open(labels / "teacher.json"))["teacher"] == "logmel_chroma"


def test_the_recipe_runs_as_a_chain_of_jobs_and_says_where_it_stands(slurm, train_data, tmp_path):
    corpus, work = os.path.join(os.path.dirname(train_data[0]), "corpus", "audio"), tmp_path / "work"
    env = {**slurm, "PYTHON": sys.executable, "TASKS_PER_NODE": "2", "CPUS_PER_TASK": "1"}
    command = ["bash", "launch/recipe.sh", corpus, "tiny", "--work", str(work), "--slurm", "--world", "2", "--workers",
               "1", "train.steps=10", "data.crop_seconds=1.0", "data.batch_size=2", "data.shuffle_buffer=8"]
    out = sh(command, env)
    jobs = dict(re.findall(r"submitted (\S+): job (\d+)", out))
    assert list(jobs) == ["shards", "fit-logmel_chroma", "dump-logmel_chroma", "pretrain", "export", "export-hf"]
    assert f"bash launch/recipe.sh --status {work}" in out
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "still queued or running" in again.stderr  # no second chain beside the first
    queued = sh(["bash", "launch/recipe.sh", "--status", str(work)], env)
    assert re.search(rf"export-hf +job {jobs['export-hf']}: PENDING Dependency", queued), queued
    wait_until(lambda: all(job_done(job, slurm) for job in jobs.values()), "the recipe's jobs", timeout=900)
    final = sh(["bash", "launch/recipe.sh", "--status", str(work)], env)
    report = json.loads((work / "report.json").read_text())
    assert all(row["done"] for row in report["stages"]), final
    assert "export-hf" in final and (work / "hf" / "config.json").exists()
    dumped = sorted(p.name for p in (work / "logs").glob(f"dump-logmel_chroma-{jobs['dump-logmel_chroma']}_*.out"))
    assert len(dumped) == 2  # one array task per part
