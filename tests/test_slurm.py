"""profiles/slurm against a real SLURM: a single-node cluster on 127.0.0.1 from Debian's packages
(tests/slurm/up.sh) runs part of the tiny test config's DAG through the profile.

Three runs share the cluster and go side by side, since a SLURM run mostly waits for the executor's
status checks: the DAG through SLURM, the same targets locally in a second copy of the workflow (outputs
compared byte for byte), and a run whose one job fails inside SLURM. Then a table is made from the SLURM
run's metrics, through the profile: a local rule, so no SLURM job. The profile is used as it is; only what
a user sets for their cluster (partition, account, GPUs) is given on the command line, plus test-only
settings: the first status check after 1 s instead of 40, and one retry instead of two for the failing job.

Needs root and Debian's apt-get (packages are installed when missing). Elsewhere the tests are skipped,
except in CI (CI=true), where that is a failure. The cluster lives in its own folder with its own ports,
configuration and munge socket, so a SLURM already running on the machine is neither used nor stopped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from workflow_copy import copy_workflow

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "slurm"
PROFILE = ROOT / "profiles" / "slurm"
CLUSTER_DIR = Path("/run/weakshot-slurm")

# Every kind of SLURM job (data, splits, training per split and per dataset, prediction, evaluation) with
# two models, SimFormer's Cross-Pair and the oracle: eight layers of jobs, each costing a status-check
# cycle (12 s at best). Table 1 would need five models: 55 s more here, on two busy cores.
TARGETS = ["results/embedded/metrics/cross_pair/split1/seed0.json", "results/embedded/metrics/oracle/split1/seed0.json"]
# What a user of the profile sets for their cluster. The test node has no GPU: gpu=0 and no GPU model.
PARTITION, ACCOUNT = "debug", "root"
CLUSTER_VALUES = {"slurm_partition": PARTITION, "slurm_account": ACCOUNT, "gpu": 0, "gpu_model": None}
# Test-only: the plugin checks job states first after this many seconds (default 40), then every 10 s
# more while nothing has finished; a layer of the DAG costs one such cycle.
TEST_ONLY = ["--slurm-init-seconds-before-status-checks", "1"]
# The three runs side by side must be over by then (measured: 2.5 to 3 min on two cores that a benchmark
# kept busy).
RUN_TIMEOUT = 600
# Table 1 from the two models above (a test-only narrowing of its rows), made after the SLURM run.
TWO_MODEL_TABLE = (
    "tables={table1: {rows: {J=50: cross_pair, J=100: cross_pair, J=150: cross_pair},"
    " reference: {FullyOracle: oracle, Base model: oracle}}}"
)
# A value that breaks one rule (generate_embedded) inside its SLURM job, given on the command line.
BROKEN = "datasets={embedded: {generator: {broken_on_purpose: 1}}}"
BROKEN_MESSAGE = "unknown key 'broken_on_purpose'"
# Test-only, for that run: one retry instead of the profile's two. A failed job does not shorten the
# status-check interval as a finished one does (1, 11, 21, 31, ... s), and Snakemake exits only after the
# interval it sleeps in, so each attempt costs more than the last: three took 165 s here, two 110 s.
FAILING_RETRIES = 1


def unavailable_reason() -> str | None:
    if sys.platform != "linux":
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root: it installs Debian's SLURM packages and starts the SLURM daemons"
    if not Path("/etc/debian_version").exists() or not shutil.which("apt-get") or not shutil.which("dpkg-query"):
        return "needs Debian's apt-get to install slurmctld, slurmd, slurmdbd, munge and mariadb-server"
    return None


def skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"the SLURM tests must run in CI, but: {reason}")
    pytest.skip(reason)


@dataclass
class Cluster:
    dir: Path
    env: dict[str, str]

    def command(self, *args: str) -> str:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60, check=True).stdout

    def jobs(self, ids: list[str]) -> dict[str, dict[str, str]]:
        """sacct's record of each job: state, rule (from the comment the executor sets), memory, time."""
        fields = ["JobIDRaw", "State", "Comment%200", "ReqMem", "TimelimitRaw", "Partition", "Account"]
        out = self.command("sacct", "-X", "--parsable2", "--noheader", f"--format={','.join(fields)}",
                           "--jobs", ",".join(ids))  # fmt: skip
        records = {}
        for line in out.splitlines():
            job_id, state, comment, mem, limit, partition, account = line.split("|")
            rule = re.match(r"rule_(.+?)_wildcards_", comment)
            records[job_id] = {"state": state, "rule": rule.group(1) if rule else comment, "mem": mem,
                               "minutes": limit, "partition": partition, "account": account}  # fmt: skip
        return records


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    reason = unavailable_reason()
    if reason:
        skip_or_fail(reason)
    env = {**os.environ, "SLURM_CI_DIR": str(CLUSTER_DIR)}
    # First stop what an earlier session that was killed may have left running (only daemons up.sh
    # started and recorded; see down.sh).
    subprocess.run(["bash", str(SCRIPTS / "down.sh")], env=env, capture_output=True, timeout=120)
    started = time.monotonic()
    up = subprocess.run(["bash", str(SCRIPTS / "up.sh")], env=env, capture_output=True, text=True, timeout=900)
    if up.returncode != 0:
        pytest.fail(f"tests/slurm/up.sh failed:\n{up.stdout[-3000:]}\n{up.stderr[-5000:]}")
    print(f"\nSLURM up (packages installed if missing, daemons started): {time.monotonic() - started:.0f} s")
    try:
        env["SLURM_CONF"] = str(CLUSTER_DIR / "etc" / "slurm.conf")
        # The cluster's client commands (wrapped to find its slurm.conf) first, then this interpreter's
        # bin folder: jobs call `python` and `python -m snakemake`.
        env["PATH"] = os.pathsep.join([str(CLUSTER_DIR / "bin"), str(Path(sys.executable).parent), env["PATH"]])
        yield Cluster(CLUSTER_DIR, env)
    finally:
        down = subprocess.run(["bash", str(SCRIPTS / "down.sh")], env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert down.returncode == 0, down.stdout + down.stderr


def cluster_flags() -> list[str]:
    """profiles/slurm's default-resources and set-resources with the cluster's own values replaced.

    A --default-resources or --set-resources flag replaces the profile's whole map of that name, so the
    flags restate every other entry of the maps as the profile has it.
    """
    profile = yaml.safe_load((PROFILE / "profile.yaml").read_text())

    def for_this_cluster(resources: dict) -> dict:
        placeholders = {key for key, value in resources.items() if "EDIT" in str(value)}
        assert placeholders <= set(CLUSTER_VALUES), f"placeholders the test does not set: {placeholders}"
        merged = {**resources, **{key: value for key, value in CLUSTER_VALUES.items() if key in resources}}
        return {key: value for key, value in merged.items() if value is not None}

    flags = ["--default-resources"]
    flags += [f"{key}={value}" for key, value in for_this_cluster(profile["default-resources"]).items()]
    flags.append("--set-resources")
    for rule, resources in profile["set-resources"].items():
        flags += [f"{rule}:{key}={value}" for key, value in for_this_cluster(resources).items()]
    return flags


def minutes(runtime: int | str) -> int:
    """A Snakemake runtime (minutes, or a number with the unit m, h or d) in minutes."""
    text = str(runtime).strip()
    unit = {"m": 1, "h": 60, "d": 24 * 60}.get(text[-1], None)
    return int(float(text[:-1]) * unit) if unit else int(text)


@dataclass
class Run:
    """A snakemake run in the background, in its own process group, its output in a file."""

    workdir: Path
    args: list[str]
    process: subprocess.Popen
    output_file: Path
    started: float = 0.0
    returncode: int | None = None
    seconds: float = 0.0

    @classmethod
    def start(cls, workdir: Path, args: list[str], env: dict[str, str], output_name: str = "snakemake.out") -> Run:
        output_file = workdir / output_name
        with output_file.open("w") as out:
            process = subprocess.Popen([sys.executable, "-m", "snakemake", *args], cwd=workdir, env=env,
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        return cls(workdir, args, process, output_file, started=time.monotonic())

    def poll(self) -> bool:
        """Whether the run is over (and then its exit status and duration are set)."""
        if self.returncode is None and self.process.poll() is not None:
            self.returncode = self.process.returncode
            self.seconds = time.monotonic() - self.started
        return self.returncode is not None

    def stop(self) -> None:
        """Snakemake ignores the first SIGTERM while jobs run ("will exit after finishing"): TERM, then
        KILL, to the whole process group. Jobs left in SLURM are cancelled by tests/slurm/down.sh."""
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.returncode, self.seconds = -1, time.monotonic() - self.started

    @staticmethod
    def wait_all(runs: list[Run], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all([run.poll() for run in runs]) and time.monotonic() < deadline:  # poll() each one
            time.sleep(0.5)
        for run in runs:
            if not run.poll():
                run.stop()

    @property
    def output(self) -> str:
        return self.output_file.read_text()

    def describe(self) -> str:
        return f"snakemake {' '.join(self.args)} (exit {self.returncode}, {self.seconds:.0f} s):\n{self.output[-6000:]}"

    def slurm_job_ids(self) -> list[str]:
        return re.findall(r"submitted with SLURM jobid (\d+)", self.output)


@dataclass
class Runs:
    slurm: Run
    local: Run
    failing: Run
    table: Run | None = None


@pytest.fixture(scope="module")
def runs(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    base = tmp_path_factory.mktemp("slurm_runs")
    tiny = ["--configfile", "config/test.yaml"]  # last: --configfile takes several values
    through_slurm = ["--profile", "profiles/slurm", *cluster_flags(), *TEST_ONLY]
    failing = ["resources/embedded/archive.zip", *through_slurm, "--retries", str(FAILING_RETRIES), "--config", BROKEN]
    started = time.monotonic()
    result = Runs(
        slurm=Run.start(copy_workflow(base / "slurm"), [*TARGETS, *through_slurm, *tiny], cluster.env),
        local=Run.start(copy_workflow(base / "local"), [*TARGETS, "--cores", "2", *tiny], cluster.env),
        failing=Run.start(copy_workflow(base / "failing"), [*failing, *tiny], cluster.env),
    )
    Run.wait_all([result.slurm, result.local, result.failing], RUN_TIMEOUT)
    print(f"\nruns side by side: {time.monotonic() - started:.0f} s (SLURM {result.slurm.seconds:.0f} s, "
          f"local {result.local.seconds:.0f} s, failing {result.failing.seconds:.0f} s)")  # fmt: skip
    if result.slurm.returncode == 0:
        table_args = ["results/table1.csv", *through_slurm, "--config", TWO_MODEL_TABLE, *tiny]
        result.table = Run.start(result.slurm.workdir, table_args, cluster.env, output_name="table.out")
        Run.wait_all([result.table], 120)
    return result


def test_the_dag_runs_through_slurm_with_the_profile(runs: Runs, cluster: Cluster):
    run = runs.slurm
    assert run.returncode == 0, run.describe()
    ids = run.slurm_job_ids()
    jobs = cluster.jobs(ids)
    assert set(jobs) == set(ids), f"sacct lists {sorted(jobs)}, snakemake submitted {ids}"
    assert all(job["state"] == "COMPLETED" for job in jobs.values()), jobs
    # Every kind of job ran in SLURM, one SLURM job per job of the DAG.
    rules = [job["rule"] for job in jobs.values()]
    assert set(rules) == {"generate_embedded", "extract", "prepare", "image_labels", "split", "split_image_labels",
                          "train", "train_dataset_model", "predict", "predict_dataset_model", "evaluate"}  # fmt: skip
    assert rules.count("train") == 1 and rules.count("evaluate") == 2
    # The profile's resources reached sbatch: the GPU rules' memory and time, partition, account, requeue.
    profile = yaml.safe_load((PROFILE / "profile.yaml").read_text())
    train = profile["set-resources"]["train"]
    for job in jobs.values():
        assert job["partition"] == PARTITION and job["account"] == ACCOUNT, job
        if job["rule"] in ("train", "train_dataset_model"):
            assert job["mem"] == f"{train['mem_mb']}M", job
            assert int(job["minutes"]) == minutes(train["runtime"]), job
    assert "Requeue=1" in cluster.command("scontrol", "show", "job", ids[-1]), "slurm-requeue did not reach sbatch"
    # Training finished, so no job left a checkpoint behind to resume from.
    assert not list((run.workdir / "results").rglob("checkpoint.pt"))


def test_the_slurm_run_gives_the_outputs_of_a_local_run(runs: Runs):
    assert runs.local.returncode == 0, runs.local.describe()
    assert runs.slurm.returncode == 0, runs.slurm.describe()
    slurm, local = runs.slurm.workdir / "results", runs.local.workdir / "results"
    compared = ["embedded/image_labels.tsv"]
    for folder in ("embedded/splits", "embedded/metrics", "embedded/predictions"):
        names = sorted(str(p.relative_to(local)) for p in (local / folder).rglob("*") if p.is_file())
        assert names == sorted(str(p.relative_to(slurm)) for p in (slurm / folder).rglob("*") if p.is_file())
        compared += names
    assert len(compared) == 7  # the above, the split and its image labels, two models' metrics and predictions
    for name in compared:
        assert (slurm / name).read_bytes() == (local / name).read_bytes(), f"results/{name} differs"
    # The numbers are real ones.
    metrics = json.loads((slurm / "embedded" / "metrics" / "cross_pair" / "split1" / "seed0.json").read_text())
    assert 0.0 <= metrics["novel_mIoU"] <= 100.0


def test_a_job_failing_inside_slurm_fails_the_run_and_shows_its_log(runs: Runs, cluster: Cluster):
    run = runs.failing
    assert run.returncode not in (0, -1), run.describe()  # failed, and not stopped at the timeout
    # The job really ran in SLURM and failed there, once per attempt: a retry is a new SLURM job.
    attempts = 1 + FAILING_RETRIES
    ids = run.slurm_job_ids()
    jobs = cluster.jobs(ids)
    assert [job["rule"] for job in jobs.values()] == ["generate_embedded"] * attempts, jobs
    assert all(job["state"] == "FAILED" for job in jobs.values()), jobs
    assert f"SLURM-job '{ids[-1]}' failed" in run.output and "Error in rule generate_embedded" in run.output
    # show-failed-logs: the job's own log, with the error the CLI wrote, and its SLURM log are printed.
    assert "Logfile logs/embedded/generate_embedded.log:" in run.output
    assert re.search(rf"Logfile \S+/slurm_logs/rule_generate_embedded/\S+/{ids[-1]}\.log:", run.output)
    assert BROKEN_MESSAGE in run.output, run.describe()


def test_tables_run_beside_snakemake_not_in_slurm(runs: Runs):
    assert runs.slurm.returncode == 0, runs.slurm.describe()
    run = runs.table
    assert run is not None and run.returncode == 0, run.describe()
    assert "localrule table:" in run.output and not run.slurm_job_ids(), run.describe()
    csv = (run.workdir / "results" / "table1.csv").read_text().splitlines()
    assert csv[0] == "row,split1,mean" and len(csv) == 6
