"""Shared test set-up: hypothesis profiles, and helpers the test files import (`from conftest import ...`).

    python -m pytest test_kimik2.py               the card's concepts (the fast tier)
    python -m pytest                              everything: test_kimik2.py and tests/ (what CI runs)
    HYPOTHESIS_PROFILE=dev python -m pytest       many more random examples, for bug hunting

Multi-process tests launch torchrun (gloo, CPU) on a worker inside their own test file
(python FILE WORKER ARGS); `torchrun` puts this folder on the workers' PYTHONPATH.
"""
import os
import re
import shutil
import signal
import subprocess
import sys

from hypothesis import HealthCheck, settings

from bench import kill_tree

# Hypothesis profiles: "ci" is derandomized, so a red CI run reproduces; "dev" hunts wider.
settings.register_profile("ci", max_examples=10, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HERE = os.path.dirname(os.path.abspath(__file__))  # the project's root folder
PROJECT_MODULES = {name[:-3] for name in os.listdir(HERE) if name.endswith(".py") and name != "conftest.py"}


def torchrun(args, timeout=120, env=None, nproc=2):
    """Run `torchrun --standalone --nproc_per_node=NPROC ARGS` from the root folder (gloo on CPU).

    Gloo can abort a worker or deadlock it at interpreter exit while a worker thread still frees a
    finished collective's tensors (PyTorch issue 56297), after all of its work is done. A run that
    ends that way (a worker killed by a signal, or no exit within the timeout) gets one more try; a
    worker that fails with an exception, i.e. a real failure, does not."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    for _ in range(2):
        proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)  # the launcher and its workers (which torchrun starts in sessions of their own)
            try:
                stdout, stderr = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:  # something still holds the pipes: give up on its output
                proc.kill()
                stdout, stderr = "", f"torchrun: no exit within {timeout} s, and its pipes stayed open"
            continue
        done = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
        if done.returncode == 0 or not re.search(r"exitcode\s*:\s*-\d", stderr.rpartition("Root Cause")[2]):
            return done
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_alone(tmp_path, filenames, script):
    """Copy `filenames` (one name or a list: a card file, or a companion with its card file) alone
    into an empty folder, run `script` there and return its stdout. The script ends by checking that
    the copies were imported from that folder and no other file of the project was imported at all
    (not even one installed elsewhere)."""
    filenames = [filenames] if isinstance(filenames, str) else list(filenames)
    folder = tmp_path / "alone"
    folder.mkdir()
    for filename in filenames:
        shutil.copy(os.path.join(HERE, filename), folder)
    modules = {f.removesuffix(".py") for f in filenames}
    project = PROJECT_MODULES | modules
    (folder / "script.py").write_text(script + f"""
import sys, os
assert {{name for name in {project!r} if name in sys.modules}} == {modules!r}, sorted(sys.modules)
for name in {modules!r}:
    assert os.path.dirname(os.path.abspath(sys.modules[name].__file__)) == os.getcwd()
print("ok")
""")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "script.py"], cwd=folder, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout
