"""How lamina's C++ kernels are built, cached and trusted (lamina/kernels/cpu_build.py), with a stand-in
for torch.utils.cpp_extension, so no test here waits for a compiler."""
import os
import stat

import pytest

from lamina.kernels import cpu_build


class FakeCppExtension:
    """Records each build and writes a 'library' where cpp_extension would; fails when told to."""

    def __init__(self):
        self.builds = []
        self.fail = False

    def load(self, name, sources, *, extra_cflags, extra_ldflags, build_directory, is_python_module, verbose):
        assert not is_python_module and "-DLAMINA_NAMESPACE=lamina_test" in extra_cflags
        assert "-O3" in extra_cflags and "-fopenmp" in extra_cflags and "-fopenmp" in extra_ldflags
        assert not any(f.startswith("-std=") for f in extra_cflags)   # cpp_extension picks torch's
        self.builds.append(name)
        open(os.path.join(build_directory, "cpu_ops.o"), "w").close()
        if self.fail:
            raise RuntimeError("Error building extension: a compiler error")
        with open(os.path.join(build_directory, f"{name}.so"), "w") as f:
            f.write(f"build {len(self.builds)}")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMINA_HOME", str(tmp_path))
    ext = FakeCppExtension()
    monkeypatch.setattr(cpu_build, "_cpp_extension", lambda: ext)
    if not cpu_build.shutil.which(cpu_build.compiler()):
        monkeypatch.setenv("CXX", "sh")  # any program on PATH stands for the compiler here
    return ext


def test_built_once_then_cached(fake, tmp_path):
    first = cpu_build.build("lamina_test")
    assert first.parent.parent == tmp_path / "kernels" and first.read_text() == "build 1"
    assert cpu_build.build("lamina_test") == first and len(fake.builds) == 1
    # another -march is another library
    assert cpu_build.build("lamina_test", march="x86-64-v2") != first and len(fake.builds) == 2


def test_untrusted_library_is_rebuilt(fake):
    library = cpu_build.build("lamina_test")
    library.chmod(0o775)                         # writable by its group: someone else could swap it
    assert cpu_build.build("lamina_test") == library and len(fake.builds) == 2
    assert library.read_text() == "build 2" and not stat.S_IMODE(library.stat().st_mode) & 0o022
    if os.getuid() == 0:                         # owned by another user (only root can arrange that)
        os.chown(library, 12345, 12345)
        assert cpu_build.build("lamina_test") == library and len(fake.builds) == 3
        assert library.stat().st_uid == 0


def test_unsafe_folder_is_refused(fake, tmp_path, monkeypatch, caplog):
    library = cpu_build.build("lamina_test")
    library.parent.chmod(0o777)
    with pytest.raises(RuntimeError, match="refusing .* writable by its group or by everyone"):
        cpu_build.build("lamina_test")
    assert len(fake.builds) == 1
    # load() turns that into a warning, the reason kept for `lamina env`
    with caplog.at_level("WARNING", logger="lamina.kernels"):
        assert not cpu_build.load("lamina_test")
    assert "refusing" in caplog.text and "refusing" in cpu_build.load_error("lamina_test")


def test_a_failed_or_killed_build_leaves_only_its_own_folder(fake, tmp_path):
    fake.fail = True
    with pytest.raises(RuntimeError, match="a compiler error"):
        cpu_build.build("lamina_test")
    kernels = tmp_path / "kernels"
    (folder,) = [p for p in kernels.iterdir() if p.is_dir()]
    assert sorted(p.name for p in kernels.iterdir()) == [folder.name, folder.name + ".lock"]
    # a killed build of torch < 2.14 leaves cpp_extension's `lock` file: the next build (holding
    # lamina's own lock, which dies with its process) clears it rather than wait for ever; and a
    # library left without its recorded hash (a killed link) is never loaded as it is
    (folder / "lock").write_text("")
    (folder / f"{folder.name}.so").write_text("half a link")
    fake.fail = False
    library = cpu_build.build("lamina_test")
    assert library.parent == folder and library.read_text() == "build 2"
    assert not (folder / "lock").exists()


def test_expected_to_build_is_the_one_rule(monkeypatch):
    monkeypatch.setattr(cpu_build.platform, "system", lambda: "Linux")
    monkeypatch.setattr(cpu_build.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("CXX", "sh")
    assert cpu_build.expected_to_build() and cpu_build.unsupported_reason() is None
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert not cpu_build.expected_to_build() and "no C++ compiler" in cpu_build.unsupported_reason()
    monkeypatch.setenv("CXX", "sh")
    monkeypatch.setattr(cpu_build.platform, "machine", lambda: "aarch64")
    assert not cpu_build.expected_to_build() and "x86-64 Linux" in cpu_build.unsupported_reason()
    monkeypatch.setattr(cpu_build.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("LAMINA_CPU_KERNELS", "0")
    assert not cpu_build.expected_to_build() and "LAMINA_CPU_KERNELS=0" in cpu_build.unsupported_reason()
    assert not cpu_build.load() and "LAMINA_CPU_KERNELS=0" in cpu_build.load_error()


def test_ninja_found_outside_path_and_nothing_left_without_a_compiler(fake, tmp_path, monkeypatch):
    """A venv used without activating it has the ninja package's binary off PATH: cpu_build.py adds it.
    Without a compiler nothing is built and no folder is left behind."""
    ninja = pytest.importorskip("ninja")
    monkeypatch.setattr(cpu_build.shutil, "which", lambda name: None if name == "ninja" else "/usr/bin/" + name)
    monkeypatch.setenv("PATH", "/nonexistent")
    cpu_build.build("lamina_test")
    assert os.environ["PATH"].split(os.pathsep)[-1] == ninja.BIN_DIR
    monkeypatch.setattr(cpu_build.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="no C.. compiler"):
        cpu_build.build("lamina_test", march="x86-64-v2")
    assert len([p for p in (tmp_path / "kernels").iterdir() if p.is_dir()]) == 1
