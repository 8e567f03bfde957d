"""The serving job's batch script: golden files, and every field refused before a script is made."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from festina_hpc.daemon.festinad import job_comment
from festina_hpc.serve.launch import ServeSpec, simulated_argv, vllm_argv
from festina_hpc.slurm.errors import SlurmInputError
from festina_hpc.slurm.sbatch import render_script
from festina_hpc.slurm.types import ServingJobSpec
from tests.slurm.conftest import GOLDEN

MPS_JOB = ServingJobSpec(model="llama-3.1-8b", instance_id="i3",
                         command=("vllm", "serve", "meta-llama/Llama-3.1-8B", "--port", "8100"),
                         output_path="/var/log/festina/%j.out", mps_pct=25, nodelist=("n1",), exclude=("n2", "n3"))
GPU_JOB = ServingJobSpec(model="meta-llama/Llama-3.1-70B", instance_id="big-0",
                         command=("python3", "-m", "server", "--say", "it's here"), output_path="/srv/out/%j.out",
                         gpus=2, gpu_type="h100", job_name="big", comment="festina:model=70b", partition="gpu",
                         account="ml-team", time_limit="1-00:00:00", hold=True,
                         env=(("FESTINA_PORT", "8200"), ("HF_HOME", "/m x")))


# festinad's own jobs, as Festinad.job_spec makes them: the server gets its secret file's path, never the secret.
SECRET_FILE = "/var/lib/festina/secrets/instance-3.secret"
_SERVE = ServeSpec(model="llama-3.1-8b", hf_name="meta-llama/Llama-3.1-8B", gpu_type="h100-sxm-80gb", port=20003,
                   sm_pct=50, secret_file=SECRET_FILE)
SECRET_JOBS = {
    "secret_emulated_job.sbatch": replace(MPS_JOB, instance_id="3", comment=job_comment("llama-3.1-8b", 3, 20003),
                                          command=tuple(simulated_argv(_SERVE, "festina")), exclude=()),
    "secret_vllm_job.sbatch": replace(MPS_JOB, instance_id="3", comment=job_comment("llama-3.1-8b", 3, 20003),
                                      command=tuple(vllm_argv(_SERVE, python="/usr/bin/python3")), exclude=()),
}


@pytest.mark.parametrize(("name", "spec"), [("mps_job.sbatch", MPS_JOB), ("gpu_job.sbatch", GPU_JOB),
                                            *SECRET_JOBS.items()])
def test_script_matches_golden_file(name: str, spec: ServingJobSpec) -> None:
    golden = GOLDEN / name
    if os.environ.get("FESTINA_UPDATE_GOLDEN"):
        golden.write_text(render_script(spec), encoding="utf-8")
    assert render_script(spec) == golden.read_text(encoding="utf-8")


@pytest.mark.parametrize(("case", "changes", "message"), [
    ("neither mps nor gpus", {"mps_pct": None}, "exactly one of mps_pct and gpus"),
    ("both", {"gpus": 1}, "exactly one of mps_pct and gpus"),
    ("mps over 100", {"mps_pct": 101}, "mps_pct 101 must be an integer percentage"),
    ("mps zero", {"mps_pct": 0}, "mps_pct 0"),
    ("gpu type with mps", {"gpu_type": "h100"}, "gpu_type goes with gpus"),
    ("newline in model", {"model": "m\n#SBATCH --uid=0"}, "model name"),
    ("space in instance", {"instance_id": "a b"}, "instance id"),
    ("empty command", {"command": ()}, "command"),
    ("newline in argument", {"command": ("sleep", "1\n2")}, "command"),
    ("relative output", {"output_path": "out/%j.out"}, "output path"),
    ("node list expression", {"nodelist": ("n[1-2]",)}, "node name 'n[1-2]'"),
    ("node list as string", {"nodelist": "n1"}, "must be a list of node names"),
    ("same node twice", {"exclude": ("n2", "n2")}, "names a node twice"),
    ("spaces in comment", {"comment": "a comment"}, "comment 'a comment'"),
    ("bad time", {"time_limit": "1 day"}, "time limit"),
    ("account with a space", {"account": "ml team"}, "account 'ml team'"),
    ("account with a newline", {"account": "a\n#SBATCH --uid=0"}, "account"),
    ("bad env name", {"env": (("lower", "x"),)}, "environment variable name"),
])
def test_bad_fields_are_refused(case: str, changes: dict[str, object], message: str) -> None:
    with pytest.raises(SlurmInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        render_script(replace(MPS_JOB, **changes))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(SECRET_JOBS))
def test_a_secret_job_names_its_secret_file_and_holds_no_secret(name: str) -> None:
    script = (GOLDEN / name).read_text(encoding="utf-8")
    assert f"--secret-file {SECRET_FILE}" in script
    comment = next(line for line in script.splitlines() if line.startswith("#SBATCH --comment="))
    assert "secret" not in comment  # squeue -o %k shows the comment to every user
    assert "VLLM_API_KEY" not in script and "--api-key" not in script and "Bearer" not in script
