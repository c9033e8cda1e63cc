"""The ``soma`` command line as a new user meets it: usage errors, help, Ctrl-C, messages, output
permissions, and the weights shipped inside the installed package."""

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import rasterio
import typer.main
from typer.testing import CliRunner

from soma_cli import __version__, cli, interrupt
from soma_cli.errors import InputError, SomaWarning
from soma_cli.io.pair import open_pair

REPO = Path(__file__).resolve().parents[1]
SAR, OPT = REPO / "examples" / "s1_vh.tif", REPO / "examples" / "s2_rgb.tif"
COMMANDS = ("register", "batch", "evaluate", "train", "export", "report")


def _env(**extra):
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]),
            **extra}


def _soma(*args, cwd=None, timeout=120):
    env = _env(COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "soma_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def _soma_inproc(monkeypatch, capsys, *args):
    """``cli.main`` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["soma", *map(str, args)])
    monkeypatch.setattr(cli.err_console, "width", 300)  # no wrapped table cells
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out, err = capsys.readouterr()
    return exc.value.code, out, err


# ----------------------------------------------------------------------------- usage errors and help


@pytest.mark.parametrize("args, message", [
    (("register", SAR, OPT), "Missing option '--out'"),
    (("register", SAR, OPT, "-o", "x.tif", "--tilesize", "256"), "--tilesize"),
    (("regster",), "No such command 'regster'"),
    (("register", "--version"), "--version"),
    (("register", SAR, OPT, "-o", "x.tif", "--tile-size", "big"), "--tile-size"),
])
def test_usage_error_is_one_line_and_the_usage(tmp_path, args, message):
    p = _soma(*args, cwd=tmp_path)
    lines = p.stderr.splitlines()
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(lines) == 2, p.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert lines[1].startswith("Usage: soma") and "--help" in lines[1]
    assert not list(tmp_path.iterdir())


def test_bare_soma_shows_the_help():
    p = _soma()
    assert p.returncode in (0, 2) and "Traceback" not in p.stderr
    assert "Usage: soma" in p.stdout and all(c in p.stdout for c in COMMANDS)


def test_help_shows_flags_examples_and_a_help_text_for_every_option():
    runner = CliRunner()
    for name in COMMANDS:
        r = runner.invoke(cli.app, [name, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0, r.output
        assert "<bool>" not in r.output, name
        assert "Examples:" in r.output and f"soma {name} " in r.output.split("Examples:")[1], name
    reg = runner.invoke(cli.app, ["register", "--help"], env={"COLUMNS": "200"}).output
    assert re.search(r"^\s+--json\s+Print", reg, re.M) and "--overwrite / --no-overwrite" in reg
    exp = runner.invoke(cli.app, ["export", "--help"], env={"COLUMNS": "200"}).output
    assert f"weights/soma-{__version__}.pt" in exp.split("Examples:")[1]
    group = typer.main.get_command(cli.app)
    for name in COMMANDS:
        for param in group.commands[name].params:
            assert (param.help or "").strip(), f"soma {name}: {param.name} has no help text"
    train = {p.name: p for p in group.commands["train"].params}
    assert train["train_groups"].default is None and train["val_groups"].default is None


def test_train_cache_needs_the_split(tmp_path):
    p = _soma("train", tmp_path, "--out", tmp_path / "run", "--prepare-only")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == "error: building a training cache needs --train-groups and --val-groups"


# ----------------------------------------------------------------------------- Ctrl-C


def _interrupt_when(proc, ready, timeout=90.0):
    """Send SIGINT to ``proc``'s process group (as a terminal's Ctrl-C does) once ``ready()``;
    returns the seconds from the signal until the process ended."""
    t_end = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"ended before it could be interrupted: {proc.communicate()}"
        assert time.monotonic() < t_end, "never got going"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.monotonic()
    try:
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return time.monotonic() - t0


def _default_sigint() -> None:
    """In the child: Ctrl-C as in a terminal, even when the tests run as a background job (whose
    children inherit SIGINT ignored, and a Python started so never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(*args, cwd):
    env = _env()
    return subprocess.Popen([sys.executable, "-m", "soma_cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, start_new_session=True,
                            preexec_fn=_default_sigint)


def _assert_interrupted(proc, seconds):
    out, err = proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines() == ["interrupted"], err
    assert seconds < 3.0, f"took {seconds:.1f} s to stop"


def test_ctrl_c_stops_register_inside_the_network(tmp_path):
    """Interrupted while the network runs (the flow's scratch file exists; the outputs are opened
    once the verdict is known): one line, exit 130, within seconds, and no output nor temporary
    file left behind."""
    proc = _start("register", SAR, OPT, "-o", tmp_path / "aligned.tif", "--flow-out", tmp_path / "disp.tif",
                  "--qa-out", tmp_path / "qa", cwd=tmp_path)
    seconds = _interrupt_when(proc, lambda: any(tmp_path.glob(".scratch.*.tmp*")))
    _assert_interrupted(proc, seconds)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ctrl_c_stops_a_batch_and_its_workers(tmp_path):
    """Two local workers mid-pair: one line, exit 130, no Dask tracebacks, no worker left; the run
    folder is claimed, so a rerun resumes."""
    import psutil

    rows = [{"id": i, "sar": SAR, "opt": OPT} for i in ("a", "b")]
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "sar", "opt"])
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    proc = _start("batch", tmp_path / "m.csv", "-o", out, "--workers", "2", cwd=tmp_path)
    children = []

    def working():
        children[:] = psutil.Process(proc.pid).children(recursive=True)
        return any(out.glob("*/.aligned.tif.*.tmp*"))

    seconds = _interrupt_when(proc, working)
    _assert_interrupted(proc, seconds)
    assert children
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
    assert (out / "runlog.jsonl").is_file()
    p = _soma("batch", tmp_path / "m.csv", "-o", out, "--method", "identity", "--workers", "1", "--no-report", "-q")
    assert p.returncode == 0, p.stderr
    assert all((out / i / "done.json").is_file() for i in ("a", "b"))


def test_ctrl_c_stops_training(tmp_path):
    from test_train import _tiny_cache

    cache = _tiny_cache(tmp_path, seed=0, size=320)
    run = tmp_path / "run"
    proc = _start("train", cache, "--out", run, "--crop", "256", "--val-chip", "256", "--steps", "1000",
                  "--threads", "1", cwd=tmp_path)
    seconds = _interrupt_when(proc, lambda: (run / "log.jsonl").is_file())  # training steps under way
    _assert_interrupted(proc, seconds)


def test_interrupted_library_call_cleans_up_or_is_abandoned(tmp_path):
    """The library call stops at its next progress report and cleans up; one stuck in a native call
    is abandoned after a grace period, and this process's temporary files are removed for it."""
    cleaned = threading.Event()

    def reporting(report):
        try:
            for i in range(400):
                time.sleep(0.01)
                report(i, 400)
        finally:
            cleaned.set()

    mine = tmp_path / f".out.tif.{os.getpid()}.abcd.tmp.tif"
    other = tmp_path / ".out.tif.1.abcd.tmp.tif"  # another process's
    # Ctrl-C raises KeyboardInterrupt here too when the tests run as a background job (SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    def stuck(report):
        mine.write_bytes(b"x")
        time.sleep(5)  # does not come back to report

    try:
        for call, abandoned in ((reporting, False), (stuck, True)):
            cleaned.clear()
            other.write_bytes(b"x")
            timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
            t0 = time.monotonic()
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                interrupt.run_interruptibly(call, lambda *a: None, outputs=(tmp_path / "out.tif",))
            assert time.monotonic() - t0 < 0.5 + interrupt.GRACE_S + 0.5
            assert cleaned.is_set() != abandoned
            assert not mine.exists() and other.exists()
    finally:
        signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------- messages


def test_affine_summary_prints_the_geotransform_in_full(tmp_path, monkeypatch, capsys):
    out = tmp_path / "a.tif"
    code, _, err = _soma_inproc(monkeypatch, capsys, "register", SAR, OPT, "-o", out, "--mode", "affine",
                                "--method", "gradient")
    assert code == 0, err
    line = next(ln for ln in err.splitlines() if "new geotransform" in ln)
    printed = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", line.split("new geotransform")[1])]
    with rasterio.open(out) as ds:
        assert printed == list(ds.transform)[:6]


def test_corrupt_raster_error_has_no_rasterio_pointer(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "corrupt.tif"
    data = bytearray(OPT.read_bytes())
    for i in range(20000, 400000, 7):  # tile data only: the header opens, pixels fail to decode
        data[i] = (data[i] * 31 + 7) % 256
    bad.write_bytes(bytes(data))
    code, _, err = _soma_inproc(monkeypatch, capsys, "register", SAR, bad, "-o", tmp_path / "a.tif",
                                "--method", "identity")
    assert code == 2 and err.count("\n") == 1, err
    assert "corrupt" in err and "previous exception" not in err and err.rstrip().endswith("corrupt.tif")
    msg = "x.tif: corrupt (Read failed. See previous exception for details.)"
    assert str(InputError(msg)) == "x.tif: corrupt"


def test_three_band_sar_warns_in_one_line(tmp_path, monkeypatch, capsys):
    with pytest.warns(SomaWarning, match="SAR raster s2_rgb.tif has 3 bands"):
        open_pair(OPT, SAR).close()
    code, _, err = _soma_inproc(monkeypatch, capsys, "register", OPT, SAR, "-o", tmp_path / "a.tif",
                                "--method", "identity", "-q")
    assert code == 0, err
    assert [ln for ln in err.splitlines() if ln.strip()] == [
        "warning: the SAR raster s2_rgb.tif has 3 bands, like an optical image; using band 1 (SAR and optical "
        "swapped?)"]


# ----------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(tmp_path, umask):
    from soma_cli.pipeline import RegisterOptions, register

    opts = RegisterOptions(sar=SAR, opt=OPT, out=tmp_path / "a.tif", flow_out=tmp_path / "d.tif",
                           qa_out=tmp_path / "qa", method="identity", cog=True)
    before = os.umask(umask)
    try:
        register(opts)
    finally:
        os.umask(before)
    products = [tmp_path / "a.tif", tmp_path / "d.tif", *sorted((tmp_path / "qa").iterdir())]
    assert len(products) > 4
    for p in products:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p.name


# ----------------------------------------------------------------------------- packaging


def test_package_list_names_every_package():
    tomllib = pytest.importorskip("tomllib")
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.relative_to(REPO).parent.parts) for p in (REPO / "soma_cli").rglob("__init__.py")}
    assert set(conf["packages"]) == found | {"soma_cli.weights"}
    assert conf["package-dir"] == {"soma_cli.weights": "weights"}


def test_wheel_ships_the_weights_and_nothing_else_from_weights(tmp_path):
    src = tmp_path / "src"  # built from a copy: setuptools leaves build/ and *.egg-info behind
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                             "benchmarks", "docs", "tests"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                        "-w", str(tmp_path / "w")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    (wheel,) = (tmp_path / "w").glob("soma_cli-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n for n in names if n.startswith("soma_cli/weights/"))
    released = sorted(f"soma_cli/weights/{p.name}" for p in (REPO / "weights").glob("soma-*.*")
                      if p.suffix in (".pt", ".json"))
    assert released and shipped == released
    assert "soma_cli/py.typed" in names and "soma_cli/check_calibration.png" in names
