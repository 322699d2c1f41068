#!/usr/bin/env bash
# Build and run the STRATO-PEFT Docker images (docker/Dockerfile.{cuda,rocm,cpu}).
#
#   scripts/docker_run.sh build                                  [--platform P] [--print]
#   scripts/docker_run.sh train CONFIG [-- MAIN_PY_ARGS...]      [--platform P] [--print]
#   scripts/docker_run.sh eval RUN_DIR [-- EVAL_PY_ARGS...]      [--platform P] [--print]
#   scripts/docker_run.sh bash | jupyter | tensorboard           [--platform P] [--print]
#
# P is auto (default: nvidia-smi -> cuda, rocminfo -> rocm, else cpu), cuda,
# rocm or cpu. Every docker command is printed before it runs; --print prints
# it and runs nothing. Run `scripts/docker_run.sh --help` for the details, and
# see docs/docker.md.
set -euo pipefail

PROG=${0##*/}
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd -P)

IMAGE_REPO=${STRATO_IMAGE:-strato-peft}
HF_CACHE=${STRATO_HF_CACHE:-strato-peft-hf-cache}
JUPYTER_PORT=${JUPYTER_PORT:-8888}
TENSORBOARD_PORT=${TENSORBOARD_PORT:-6006}
TENSORBOARD_LOGDIR=${TENSORBOARD_LOGDIR:-/workspace/logs}

usage() {
    cat <<EOF
Usage: $PROG COMMAND [ARG] [--platform auto|cuda|rocm|cpu] [--print] [-- EXTRA...]

Commands:
  build              build the runtime image $IMAGE_REPO:PLATFORM (with TensorBoard)
                     and the dev image $IMAGE_REPO:PLATFORM-dev (adds JupyterLab)
  train CONFIG       python main.py --config CONFIG [EXTRA...]
  eval RUN_DIR       python scripts/eval.py --checkpoint RUN_DIR [EXTRA...]
  bash               an interactive shell in the runtime image
  jupyter            JupyterLab on http://127.0.0.1:$JUPYTER_PORT (the repository at /workspace)
  tensorboard        TensorBoard on http://127.0.0.1:$TENSORBOARD_PORT (logdir $TENSORBOARD_LOGDIR)

Options:
  --platform P       auto (default), cuda, rocm or cpu; auto picks cuda when
                     \`nvidia-smi -L\` works, rocm when \`rocminfo\` works, else cpu
  --print            print the docker command(s) and exit without running them
  -h, --help         this help

Containers run as your user (--user \$(id -u):\$(id -g)) with configs/ (read-only),
results/ and logs/ of this checkout bind-mounted under /workspace, and the
Hugging Face cache (HF_HOME) on the volume $HF_CACHE.

Environment:
  STRATO_IMAGE        image repository (default strato-peft)
  STRATO_HF_CACHE     volume name or absolute host path for HF_HOME
                      (default strato-peft-hf-cache)
  STRATO_DOCKER_ARGS  extra \`docker run\` arguments, e.g. "-v /data/models:/models:ro"
  JUPYTER_PORT, TENSORBOARD_PORT, TENSORBOARD_LOGDIR
  HF_TOKEN, WANDB_API_KEY, WANDB_MODE are passed through when set.
EOF
}

usage_error() {
    printf '%s: error: %s\n' "$PROG" "$1" >&2
    printf "Run '%s --help' for usage.\n" "$PROG" >&2
    exit 2
}

die() {
    printf '%s: error: %s\n' "$PROG" "$1" >&2
    exit 1
}

# Absolute, symlink-free path of an existing file or directory.
abspath() {
    local target=$1 dir base
    if [[ -d $target ]]; then
        (cd -- "$target" && pwd -P)
        return
    fi
    if [[ $target == */* ]]; then
        dir=${target%/*}
        base=${target##*/}
    else
        dir=.
        base=$target
    fi
    dir=$(cd -- "${dir:-/}" && pwd -P)
    printf '%s/%s\n' "${dir%/}" "$base"
}

detect_platform() {
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo cuda
    elif command -v rocminfo >/dev/null 2>&1 && rocminfo >/dev/null 2>&1; then
        echo rocm
    else
        echo cpu
    fi
}

# --- arguments -------------------------------------------------------------

command=""
positional=()
extra=()
platform=auto
print_only=false

while (($# > 0)); do
    case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --print)
            print_only=true
            ;;
        --platform)
            (($# > 1)) || usage_error "--platform needs a value: auto, cuda, rocm or cpu"
            platform=$2
            shift
            ;;
        --platform=*)
            platform=${1#--platform=}
            ;;
        --)
            shift
            extra=("$@")
            break
            ;;
        -*)
            usage_error "unknown option '$1'"
            ;;
        *)
            if [[ -z $command ]]; then
                command=$1
            else
                positional+=("$1")
            fi
            ;;
    esac
    shift
done

[[ -n $command ]] || usage_error "missing command: build, train, eval, bash, jupyter or tensorboard"

case $command in
    train | eval)
        ((${#positional[@]} >= 1)) || usage_error "'$command' needs $([[ $command == train ]] && echo CONFIG || echo RUN_DIR)"
        ((${#positional[@]} == 1)) || usage_error "'$command' takes one argument, got: ${positional[*]}"
        ;;
    build | bash | jupyter | tensorboard)
        ((${#positional[@]} == 0)) || usage_error "'$command' takes no argument, got: ${positional[*]}"
        ;;
    *)
        usage_error "unknown command '$command' (expected build, train, eval, bash, jupyter or tensorboard)"
        ;;
esac
if ((${#extra[@]} > 0)) && [[ $command != train && $command != eval ]]; then
    usage_error "arguments after -- are only for train and eval"
fi

case $platform in
    auto) platform=$(detect_platform) ;;
    cuda | rocm | cpu) ;;
    *) usage_error "unknown platform '$platform' (expected auto, cuda, rocm or cpu)" ;;
esac

# --- docker command lines ---------------------------------------------------

image="$IMAGE_REPO:$platform"
dev_image="$IMAGE_REPO:$platform-dev"

if [[ $command == build ]]; then
    git_commit=unknown
    if command -v git >/dev/null 2>&1 && git -C "$REPO_ROOT" rev-parse --verify -q HEAD >/dev/null 2>&1; then
        git_commit=$(git -C "$REPO_ROOT" rev-parse HEAD)
        if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
            git_commit+="-dirty"
        fi
    fi
    build_runtime=(docker build --file "$REPO_ROOT/docker/Dockerfile.$platform"
        --target runtime --tag "$image" --build-arg "GIT_COMMIT=$git_commit" "$REPO_ROOT")
    build_dev=(docker build --file "$REPO_ROOT/docker/Dockerfile.$platform"
        --target dev --tag "$dev_image" --build-arg "GIT_COMMIT=$git_commit" "$REPO_ROOT")
else
    run=(docker run --rm --init --ipc=host)
    if [[ $command == bash ]]; then
        run+=(--interactive)
        [[ -t 0 && -t 1 ]] && run+=(--tty)
    elif [[ -t 0 && -t 1 ]]; then
        run+=(--interactive --tty)
    fi
    run+=(--user "$(id -u):$(id -g)")

    # Accelerator access; TensorBoard only reads event files and needs none.
    if [[ $command != tensorboard ]]; then
        case $platform in
            cuda)
                run+=(--gpus all)
                ;;
            rocm)
                render_group=render
                if render_gid=$(getent group render 2>/dev/null | cut -d: -f3) && [[ -n $render_gid ]]; then
                    render_group=$render_gid
                fi
                run+=(--device /dev/kfd --device /dev/dri
                    --group-add video --group-add "$render_group"
                    --security-opt seccomp=unconfined)
                ;;
        esac
    fi

    run+=(--env HF_TOKEN --env WANDB_API_KEY --env WANDB_MODE)

    case $command in
        jupyter)
            # results/ and logs/ again: they are VOLUMEs of the image, which
            # would otherwise get fresh anonymous volumes over the checkout's.
            run+=(--volume "$REPO_ROOT:/workspace"
                --volume "$REPO_ROOT/results:/workspace/results"
                --volume "$REPO_ROOT/logs:/workspace/logs"
                --volume "$HF_CACHE:/cache/huggingface"
                --publish "127.0.0.1:$JUPYTER_PORT:8888")
            ;;
        tensorboard)
            run+=(--volume "$REPO_ROOT/results:/workspace/results:ro"
                --volume "$REPO_ROOT/logs:/workspace/logs:ro"
                --publish "127.0.0.1:$TENSORBOARD_PORT:6006")
            ;;
        *)
            run+=(--volume "$REPO_ROOT/configs:/workspace/configs:ro"
                --volume "$REPO_ROOT/results:/workspace/results"
                --volume "$REPO_ROOT/logs:/workspace/logs"
                --volume "$HF_CACHE:/cache/huggingface")
            ;;
    esac

    case $command in
        train)
            config=${positional[0]}
            [[ -f $config ]] || die "config file not found: $config"
            config_abs=$(abspath "$config")
            if [[ $config_abs == "$REPO_ROOT/configs/"* ]]; then
                config_in_container=${config_abs#"$REPO_ROOT/"}
            else
                # A config outside configs/: mount its folder, so that files it
                # refers to next to it are there too.
                run+=(--volume "${config_abs%/*}:/workspace/external/config:ro")
                config_in_container=/workspace/external/config/${config_abs##*/}
            fi
            ;;
        eval)
            run_dir=${positional[0]}
            [[ -d $run_dir ]] || die "run directory not found: $run_dir"
            run_dir_abs=$(abspath "$run_dir")
            if [[ $run_dir_abs == "$REPO_ROOT/results/"* ]]; then
                run_dir_in_container=${run_dir_abs#"$REPO_ROOT/"}
            else
                run+=(--volume "$run_dir_abs:/workspace/external/run")
                run_dir_in_container=/workspace/external/run
            fi
            ;;
    esac

    if [[ -n ${STRATO_DOCKER_ARGS:-} ]]; then
        read -r -a user_args <<<"$STRATO_DOCKER_ARGS"
        run+=("${user_args[@]}")
    fi

    case $command in
        train) run+=("$image" python main.py --config "$config_in_container") ;;
        eval) run+=("$image" python scripts/eval.py --checkpoint "$run_dir_in_container") ;;
        bash) run+=("$image" bash) ;;
        jupyter) run+=("$dev_image" jupyter lab --ip=0.0.0.0 --port=8888 --no-browser
            --ServerApp.root_dir=/workspace) ;;
        tensorboard) run+=("$image" tensorboard --logdir "$TENSORBOARD_LOGDIR"
            --host 0.0.0.0 --port 6006) ;;
    esac
    # ${a[@]+"${a[@]}"}: an empty array under `set -u` on bash < 4.4 (macOS).
    run+=(${extra[@]+"${extra[@]}"})
fi

# --- print, then run ---------------------------------------------------------

# Print a command as one shell-quoted line that can be pasted back.
print_command() {
    printf '%q' "$1"
    shift
    (($# == 0)) || printf ' %q' "$@"
    printf '\n'
}

if $print_only; then
    if [[ $command == build ]]; then
        print_command "${build_runtime[@]}"
        print_command "${build_dev[@]}"
    else
        print_command "${run[@]}"
    fi
    exit 0
fi

if ! command -v docker >/dev/null 2>&1; then
    die "docker not found on PATH. Install Docker Engine (https://docs.docker.com/engine/install/) \
and, for GPUs, the NVIDIA Container Toolkit or the ROCm container setup; \
'$PROG --print ...' shows the command without running it."
fi
if ! docker_error=$(docker info 2>&1 >/dev/null); then
    die "cannot reach the Docker engine; check that the daemon is running and that \
this user may use it (the docker group, or rootless Docker). 'docker info' said: ${docker_error:-nothing}"
fi

# Print a command on stderr, then run it.
run_command() {
    printf '+ ' >&2
    print_command "$@" >&2
    "$@"
}

if [[ $command == build ]]; then
    run_command "${build_runtime[@]}"
    run_command "${build_dev[@]}"
else
    # Create the bind-mount sources as this user; Docker would make them root's.
    mkdir -p "$REPO_ROOT/results" "$REPO_ROOT/logs"
    run_command "${run[@]}"
fi
