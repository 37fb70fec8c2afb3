"""tcurlora.jobs: job files, the worker subprocess, its JSON event stream, cancel and kill (real processes)."""

import json
import os
import sys
import textwrap
import time

import pytest

from tcurlora import jobs
from tcurlora.jobs import WorkerJob

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_script(tmp_path, body: str, name: str = "stand_in_worker.py") -> str:
    """A stand-in worker: gets the job path as argv[1]; ``emit(event, **fields)`` prints one JSON line."""
    header = textwrap.dedent("""
        import json, os, sys, time
        JOB = json.load(open(sys.argv[1], encoding="utf-8"))
        def emit(event, **fields):
            fields["event"] = event
            print(json.dumps(fields), flush=True)
        def stopped():
            return os.path.exists(JOB["stop_file"])
    """)
    path = tmp_path / name
    path.write_text(header + textwrap.dedent(body), encoding="utf-8")
    return str(path)


def run_to_end(job: WorkerJob, timeout: float = 30.0):
    job.start()
    assert job.wait(timeout) is not None, "worker did not finish"
    events = job.poll_events()
    assert job.finished
    return events


def minimal_segment_job(workdir: str) -> dict:
    return jobs.segment_job(base="deepbet", inputs=[os.path.join(workdir, "input.nrrd")],
                            output=os.path.join(workdir, "segmentation.seg.nrrd"),
                            stop_file=os.path.join(workdir, "STOP"))


# ----------------------------------------------------------------------------------------------------------
# pure helpers


def test_parse_event_line():
    assert jobs.parse_event_line('{"event": "log", "message": "hi"}\n') == {"event": "log", "message": "hi"}
    assert jobs.parse_event_line("   \n") is None
    raw = jobs.parse_event_line("UserWarning: something\n", "stderr")
    assert raw == {"event": "log", "message": "UserWarning: something", "raw": True, "stream": "stderr"}
    # JSON without an "event" key, a JSON list and broken JSON are all plain log lines
    for line in ('{"message": "no event"}', "[1, 2]", '{"event": "log", '):
        assert jobs.parse_event_line(line)["raw"] is True
    # a JSON event on stderr is not trusted as an event
    assert jobs.parse_event_line('{"event": "result"}', "stderr")["event"] == "log"


def test_format_eta():
    assert jobs.format_eta(None) == ""
    assert jobs.format_eta(-1) == ""
    assert jobs.format_eta(float("nan")) == ""
    assert jobs.format_eta(4.4) == "4 s"
    assert jobs.format_eta(75.2) == "1 min 15 s"
    assert jobs.format_eta(3 * 3600 + 5 * 60) == "3 h 05 min"


def test_segment_job_fields(tmp_path):
    job = jobs.segment_job(base="deepbet", inputs=[tmp_path / "input.nrrd"], output=tmp_path / "out.seg.nrrd",
                           stop_file=tmp_path / "STOP", adapter=tmp_path / "a.safetensors", device="cuda",
                           tta=True)
    assert job["version"] == 1 and job["command"] == "segment"
    assert job["inputs"] == [str(tmp_path / "input.nrrd")]
    assert job["adapter"] == str(tmp_path / "a.safetensors")
    assert job["tta"] is True and job["largest_component"] is None and job["device"] == "cuda"  # base decides
    json.dumps(job)  # serialisable
    assert jobs.segment_job(base={"spec": "s.json", "weights": "w.pt"}, inputs=["i"], output="o",
                            stop_file="s")["base"] == {"spec": "s.json", "weights": "w.pt"}
    with pytest.raises(ValueError):
        jobs.segment_job(base="deepbet", inputs=["i"], output="o", stop_file="s", device="gpu")
    with pytest.raises(ValueError):
        jobs.segment_job(base={"spec": "s.json"}, inputs=["i"], output="o", stop_file="s")
    with pytest.raises(ValueError):
        jobs.segment_job(base="deepbet", inputs=[], output="o", stop_file="s")


def test_finetune_job_fields():
    cases = [{"image": "a.nrrd", "label": "a.seg.nrrd"}]
    job = jobs.finetune_job(base="deepbet", cases=cases, out="x.safetensors", stop_file="STOP",
                            labels=[{"value": 2, "name": "Lesion", "color": [1, 0, 0], "terminology": "t"}],
                            patch_size=(64, 64, 32))
    assert job["command"] == "finetune" and job["method"] == "tcurlora" and job["rank"] == 8
    assert job["steps"] == 30 and job["lr"] is None and job["resume"] is False and job["seed"] == 0
    assert job["validation"] == [] and job["patch_size"] == [64, 64, 32]
    assert job["labels"] == [{"value": 2, "name": "Lesion", "color": [1.0, 0.0, 0.0], "terminology": "t"}]
    assert jobs.finetune_job(base="deepbet", cases=cases, out="x.safetensors", stop_file="s")["labels"] is None
    for bad in ({"method": "adalora"}, {"rank": 0}, {"steps": 0}, {"lr": 0.0}, {"patch_size": [1, 2]},
                {"device": "tpu"}):
        with pytest.raises(ValueError):
            jobs.finetune_job(base="deepbet", cases=cases, out="x.safetensors", stop_file="s", **bad)
    with pytest.raises(ValueError):
        jobs.finetune_job(base="deepbet", cases=[], out="x.safetensors", stop_file="s")
    with pytest.raises(ValueError):
        jobs.finetune_job(base="deepbet", cases=[{"image": "a.nrrd"}], out="x.safetensors", stop_file="s")


# ----------------------------------------------------------------------------------------------------------
# the process


def test_events_in_order_with_noise_and_exit(tmp_path):
    script = write_script(tmp_path, """
        emit("log", message="started " + JOB["command"])
        print("a library printed this", flush=True)
        sys.stderr.write("UserWarning: on stderr\\n"); sys.stderr.flush()
        for step in range(1, 4):
            emit("progress", phase="segment", step=step, total=3, loss=None, dice=None, eta_s=0.0)
        emit("warning", message="careful")
        emit("log", message="PYTHONPATH=" + os.environ.get("PYTHONPATH", ""))
        emit("log", message="cwd=" + os.getcwd())
        emit("result", outputs={"segmentation": JOB["output"]}, metrics={}, cancelled=False)
    """)
    workdir = str(tmp_path / "work")
    job = WorkerJob(minimal_segment_job(workdir), workdir=workdir, script=script, pythonpath=["/some/engine"])
    events = run_to_end(job)
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "exit" and events[-1]["returncode"] == 0
    assert events[-1]["cancelled"] is False and events[-1]["killed"] is False
    stdout_events = [e for e in events if e.get("stream") != "stderr" and e["event"] != "exit"]
    assert [e["event"] for e in stdout_events] == ["log", "log", "progress", "progress", "progress", "warning",
                                                   "log", "log", "result"]
    assert stdout_events[1] == {"event": "log", "message": "a library printed this", "raw": True, "stream": "stdout"}
    assert [e["step"] for e in events if e["event"] == "progress"] == [1, 2, 3]
    assert any(e.get("stream") == "stderr" and "UserWarning" in e["message"] for e in events)
    pythonpath = next(e["message"] for e in events if e.get("message", "").startswith("PYTHONPATH="))
    assert pythonpath.split("=", 1)[1].split(os.pathsep)[0] == "/some/engine"
    cwd = next(e["message"] for e in events if e.get("message", "").startswith("cwd="))
    assert os.path.samefile(cwd.split("=", 1)[1], workdir)
    with open(job.job_path, encoding="utf-8") as f:
        written = json.load(f)
    assert written == job.job and written["stop_file"] == os.path.join(workdir, "STOP")
    assert job.poll_events() == []
    job.cleanup()
    assert not os.path.exists(workdir)
    job.cleanup()  # idempotent


def test_defaults_fill_workdir_and_stop_file(tmp_path):
    script = write_script(tmp_path, """
        emit("log", message=JOB["stop_file"])
    """)
    job = WorkerJob({"command": "segment"}, script=script)
    try:
        assert os.path.basename(job.workdir).startswith("tcurlora-")
        assert job.job["version"] == 1 and job.stop_file == os.path.join(job.workdir, "STOP")
        events = run_to_end(job)
        assert events[0]["message"] == job.stop_file
        assert job.command_line == [sys.executable, script, job.job_path]
    finally:
        job.cleanup()
    assert not os.path.exists(job.workdir)


def test_module_mode_and_pythonpath(tmp_path):
    """``-m module`` with the module found only through the PYTHONPATH the job passes."""
    package = tmp_path / "pkgroot" / "standin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "worker.py").write_text(textwrap.dedent("""
        import json, sys
        job = json.load(open(sys.argv[1]))
        print(json.dumps({"event": "result", "outputs": {}, "metrics": {"command": job["command"]},
                          "cancelled": False}), flush=True)
    """))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    job = WorkerJob({"command": "finetune"}, workdir=str(tmp_path / "w"), module="standin.worker",
                    pythonpath=[str(tmp_path / "pkgroot")], env=env)
    events = run_to_end(job)
    assert job.command_line[1:3] == ["-m", "standin.worker"]
    assert events[0]["metrics"] == {"command": "finetune"} and events[-1]["returncode"] == 0
    job.cleanup()


def test_error_exit_status(tmp_path):
    script = write_script(tmp_path, """
        emit("error", message="adapter.safetensors: trained on another base model")
        sys.exit(2)
    """)
    job = WorkerJob({"command": "segment"}, workdir=str(tmp_path / "w"), script=script)
    events = run_to_end(job)
    assert events[0] == {"event": "error", "message": "adapter.safetensors: trained on another base model"}
    assert events[-1]["returncode"] == jobs.EXIT_ERROR and job.returncode == 2
    job.cleanup()


def test_poll_is_non_blocking(tmp_path):
    script = write_script(tmp_path, """
        time.sleep(2)
        emit("log", message="late")
    """)
    job = WorkerJob({"command": "segment"}, workdir=str(tmp_path / "w"), script=script)
    job.start()
    try:
        t0 = time.monotonic()
        assert job.poll_events() == []
        assert time.monotonic() - t0 < 0.1
        assert job.running and not job.finished
    finally:
        job.cleanup()
    assert not job.running


def test_cancel_with_stop_file(tmp_path):
    script = write_script(tmp_path, """
        for step in range(1, 10000):
            if stopped():
                emit("result", outputs={"checkpoint": "ckpt"}, metrics={}, cancelled=True)
                sys.exit(3)
            emit("progress", phase="train", step=step, total=10000, loss=1.0 / step, dice=None, eta_s=None)
            time.sleep(0.01)
    """)
    job = WorkerJob(minimal_segment_job(str(tmp_path / "w")), workdir=str(tmp_path / "w"), script=script)
    job.start()
    deadline = time.monotonic() + 20
    seen = []
    while not seen and time.monotonic() < deadline:
        seen = [e for e in job.poll_events() if e["event"] == "progress"]
        time.sleep(0.01)
    assert seen, "no progress before cancelling"
    t0 = time.monotonic()
    job.cancel(grace_s=20)  # returns at once
    assert time.monotonic() - t0 < 0.5
    assert os.path.exists(job.stop_file)
    assert job.wait(10) == jobs.EXIT_CANCELLED
    events = job.poll_events()
    assert any(e["event"] == "result" and e["cancelled"] for e in events)
    assert events[-1] == {"event": "exit", "returncode": 3, "cancelled": True, "killed": False}
    job.cleanup()


def test_restart_removes_stale_stop_file(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "STOP").write_text("old")
    script = write_script(tmp_path, """
        emit("log", message="stopped" if stopped() else "running")
    """)
    job = WorkerJob({"command": "finetune", "resume": True}, workdir=str(workdir), script=script)
    events = run_to_end(job)
    assert events[0]["message"] == "running"
    with pytest.raises(RuntimeError):
        job.start()  # one process per WorkerJob
    job.cleanup()


@pytest.mark.skipif(os.name == "nt", reason="process-group check uses POSIX signals")
def test_cancel_kills_the_whole_process_tree_after_grace(tmp_path):
    """A worker that ignores the stop file (and SIGTERM) and has a child: both are gone after the grace period."""
    child_pid_file = tmp_path / "child.pid"
    script = write_script(tmp_path, f"""
        import signal, subprocess
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(child_pid_file)!r}, "w").write(str(child.pid))
        emit("log", message="child started")
        while True:
            time.sleep(0.05)
    """)
    job = WorkerJob({"command": "finetune"}, workdir=str(tmp_path / "w"), script=script)
    job.start()
    deadline = time.monotonic() + 20
    while not any(e.get("message") == "child started" for e in job.poll_events()):
        assert time.monotonic() < deadline, "worker did not start its child"
        time.sleep(0.02)
    child_pid = int(child_pid_file.read_text())
    job.cancel(grace_s=0.5)
    rc = job.wait(15)
    assert rc is not None and rc < 0  # killed by a signal
    events = job.poll_events()
    assert events[-1]["killed"] is True and events[-1]["cancelled"] is True
    deadline = time.monotonic() + 5
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child_pid), "the worker's child survived the kill"
    job.cleanup()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (killed, not yet reaped by init) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def test_cleanup_stops_a_running_worker(tmp_path):
    script = write_script(tmp_path, """
        while True:
            time.sleep(0.05)
    """)
    job = WorkerJob({"command": "segment"}, workdir=str(tmp_path / "w"), script=script)
    job.start()
    time.sleep(0.2)
    job.cleanup()
    assert not job.running and job.finished
    assert not os.path.exists(job.workdir)


def test_stand_in_worker_of_the_slicer_modules_speaks_the_protocol(tmp_path):
    """Testing/standin_worker.py (used by the module self-tests) run as a script with the repo on PYTHONPATH."""
    workdir = str(tmp_path / "w")
    job = WorkerJob({"command": "segment", "inputs": [], "output": "x", "stop_file": os.path.join(workdir, "STOP")},
                    workdir=workdir, script=os.path.join(REPO, "Testing", "standin_worker.py"), pythonpath=[REPO])
    events = run_to_end(job)
    assert events[0]["event"] == "error" and "input image missing" in events[0]["message"]
    assert events[-1]["returncode"] == jobs.EXIT_ERROR
    job.cleanup()
