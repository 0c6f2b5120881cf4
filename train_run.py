"""
train.py's run folder: what makes a training run safe to stop, resume and rerun. train.py (the loop)
imports this file when a run starts; it imports kimik2.py and data.py, never train.py.

Each invariant is enforced in one place:

1. Never delete the best (`RunFolder.prune`): pruning to --keep-ckpts never deletes the checkpoint
   with the best validation loss, nor the newest checkpoint from before a divergence (see
   `Divergence` in train.py for the rule).
2. Confined (`RunFolder.read_manifest`, `RunFolder.remove`, `RunFolder.move`): train.py deletes,
   moves or replaces only plain paths inside --out that its manifest (train_files.json) lists as
   written by it: no absolute path, no "..", no symlink leading out (`data.confined`). A manifest
   naming anything else is refused in one line before anything is touched.
3. Verified on read (`RunFolder.verify`, `load_checkpoint`, `read_metrics`): every file train.py
   writes has its length and SHA-256 recorded when it is written (`data.write_atomically` returns
   them; the manifest carries its own digest, each checkpoint the digest of the metrics written up
   to it) and is verified before it is used; a corrupt one is named, with the older good checkpoint.
4. One error boundary (`main`): anything unexpected ends in one line naming the file or option and
   the path of the saved traceback; SIGINT, SIGTERM and SIGHUP end the program in one line at any
   moment (`StopSignals`: in the loop after a checkpoint, so that --resume continues exactly).
5. Check before change: every refusal comes before the first file is written, moved or deleted.

One process writes a run folder: it holds train.lock (flock; the kernel lets go when the process
ends, also after SIGKILL) for its whole life, and a second one is refused, naming the holder.
"""
import atexit
import fcntl
import glob
import hashlib
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
import zipfile
from contextlib import contextmanager, suppress

import numpy as np
import torch
import torch.distributed as dist

import data
from kimik2 import Config, KimiK2

MANIFEST = "train_files.json"  # the files train.py wrote in the run folder, with their digests
LOCK = "train.lock"  # held by the process writing the run folder; its one line names that process
METRICS = "metrics.jsonl"
CHECKPOINT_NAME = re.compile(r"ckpt_(\d{7})\.pt")
CHECKPOINT_KEYS = {"step", "model", "optimizer", "optimizer_per_rank", "scaler", "sampler", "rng", "config",
                   "window", "bad_steps"}
# Options a checkpoint's run must share with the resuming run: they change what "step N" means.
RESUME_MUST_MATCH = ("init_from", "model", "optimizer", "batch_size", "seq_len", "data", "val_data", "val_seed",
                     "dtype")
INTERRUPTED = 130  # exit status after a signal (128 + SIGINT, as a shell reports Ctrl-C)
_held_locks = {}  # lock path -> descriptor: a later main() in the same process (tests) takes its own lock over


def fail(message):
    """Stop with a one-line message naming the option or file at fault (exit status 1); train.fail
    is its twin, for the refusals of the card file, which copies without this one."""
    raise SystemExit(f"train.py: error: {message}")


@contextmanager
def naming(what):
    """Whatever fails inside is reported by the error boundary as a failure of `what` (a file or an
    option): a full disk inside safetensors or torch raises errors that name no file."""
    try:
        yield
    except Exception as e:
        if not isinstance(e, OSError) or e.filename is None:
            e.add_note(f"train.py: {what}")
        raise


# -----------------------------------------------------------------------------
# The run folder and its manifest

class RunFolder:
    """--out and its manifest: the files train.py wrote there, each with its length and SHA-256 (None
    for a file still being written or appended to), and each checkpoint's validation loss. A name is
    listed before its file is written, and the manifest is replaced atomically, so a kill at any
    moment leaves every file of the run listed. A name ending in "/" claims a whole folder while other
    writers fill it (the hf/ export)."""

    def __init__(self, path, exempt=()):
        self.path = path
        self.exempt = {os.path.realpath(p) for p in exempt}  # folders of other programs (a --data-cache inside --out)
        self.read_manifest()

    def join(self, name):
        return os.path.join(self.path, name)

    def read_manifest(self):
        """Read and check the manifest. `problem` is the one line that says why it cannot be used
        (corrupt, or naming a path outside the folder), else None; without one, nothing is listed."""
        self.files, self.val_losses, self.listed, self.problem = {}, {}, False, None
        path = self.join(MANIFEST)
        if not os.path.isfile(path):
            return
        try:
            with open(path, "rb") as f:
                manifest = json.loads(f.read())
            if manifest["written_by"] != "train.py":
                raise ValueError
            files = manifest["files"]
            if isinstance(files, list):  # written before digests were recorded
                files = dict.fromkeys(files)
            elif manifest.get("sha256") != _manifest_digest(manifest):
                raise ValueError
        except (ValueError, KeyError, TypeError, AttributeError):
            self.problem = (f"{path} fails its check (its bytes changed after train.py wrote it): train.py does "
                            f"not act on a list it cannot verify; continue the run into a new --out with --resume "
                            f"{self.join('ckpt_N.pt')} --out NEW")
            return
        for name in files:
            try:
                data.confined(self.path, name.rstrip("/"))
            except ValueError as e:
                self.problem = f"{path} lists {name!r}: {e}; train.py touches nothing outside its --out"
                return
        self.files, self.val_losses, self.listed = files, manifest.get("val_losses", {}), True

    def _save(self):
        manifest = {"written_by": "train.py", "files": self.files, "val_losses": self.val_losses}
        manifest["sha256"] = _manifest_digest(manifest)
        with naming(self.join(MANIFEST)):
            data.write_atomically(self.join(MANIFEST), lambda f: json.dump(manifest, f, indent=1, sort_keys=True))
        self.listed = True

    def ours(self, name):
        if name == MANIFEST:
            return self.listed
        name = name.removesuffix(".tmp")  # data.write_atomically's temporary file of a listed name
        name = re.sub(r"^(.*/)?\.(.+)\.\d+\.\d+$", r"\1\2", name)
        return name in (LOCK, MANIFEST) or name in self.files or any(name.startswith(f) for f in self.files if f.endswith("/"))

    def names(self):
        """Every file, link or other non-folder entry under the folder, as a relative path, in order (lazily:
        a check of a user's large folder stops at its first file)."""
        for folder, dirs, names in os.walk(self.path):
            links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
            dirs[:] = sorted(d for d in dirs if d not in links and os.path.realpath(os.path.join(folder, d)) not in self.exempt)
            yield from (os.path.relpath(os.path.join(folder, n), self.path) for n in sorted(names + links))

    def take(self, command):
        """Lock the folder, then check it: None, or the one line that says why train.py may not write here
        (rank 0 only). The lock comes first, so that no other run writes between the check and this run's
        writes; a folder refused is left as it was."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            return f"--out {self.path}: exists and is not a folder"
        lock = os.path.realpath(self.join(LOCK))
        with suppress(KeyError):  # this process held it (an earlier main() in it): let go, line and all
            held = _held_locks.pop(lock)
            os.ftruncate(held, 0)
            os.close(held)
        created_folder, created_lock = not os.path.exists(self.path), not os.path.exists(lock)
        try:
            os.makedirs(self.path, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            return f"--out {self.path}: cannot write {e.filename}: {e.strerror}"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            return f"--out {self.path} is in use by {holder}: wait for it or stop it, or choose another --out"
        self.read_manifest()
        self.created = (created_folder, created_lock)
        if problem := self.refusal():
            self.untake()
            os.close(fd)
            return problem
        if previous := os.pread(fd, 4096, 0).decode(errors="replace").strip():  # a killed holder's line
            print(f"--out {self.path}: the lock of {previous}, which has ended, is taken over")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({command})\n".encode(), 0)
        atexit.register(lambda: fd in _held_locks.values() and os.ftruncate(fd, 0))  # an orderly end empties it
        _held_locks[lock] = fd  # open for the life of the process: closing it would let go
        return None

    def untake(self):
        """Remove the lock file (and the folder) if `take` created them: a refusal leaves no trace."""
        created_folder, created_lock = getattr(self, "created", (False, False))
        if created_lock:
            with suppress(FileNotFoundError):
                os.remove(self.join(LOCK))
        if created_folder:
            with suppress(OSError):
                os.rmdir(self.path)

    @contextmanager
    def untaken_on_failure(self):
        """Checks after `take` and before the first write: a refusal or a signal there leaves --out as it was."""
        try:
            yield
        except BaseException:
            self.untake()
            raise

    def refusal(self):
        """None, or why train.py may not use this folder: its manifest cannot be used, or the folder holds
        a file train.py did not write."""
        if self.problem:
            return self.problem
        if os.path.isdir(self.path) and (foreign := next((n for n in self.names() if not self.ours(n)), None)):
            return (f"--out {self.path} holds files that are not train.py's (not listed in its {MANIFEST}), e.g. "
                    f"{self.join(foreign)}: train.py never writes beside them; move them, or choose an empty or "
                    f"new --out")
        return None

    @staticmethod
    def _holder(fd):
        for _ in range(100):  # the holder writes its line once it has checked the folder
            if line := os.pread(fd, 4096, 0).decode(errors="replace").strip():
                return line
            time.sleep(0.01)
        return "another process"

    def claim(self, *names):
        """List `names` as train.py's before they are written."""
        if new := [n for n in names if n not in self.files]:
            self.files.update(dict.fromkeys(new))
            self._save()

    def forget(self, *names):
        for name in names:
            self.files.pop(name, None)
            self.val_losses.pop(name, None)
        self._save()

    def write(self, name, write, mode="w"):
        """Write `name` atomically and record its digest."""
        self.claim(name)
        path = data.confined(self.path, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with naming(path):
            self.files[name] = data.write_atomically(path, write, mode)
        self._save()

    def record(self, *names):
        """Record the digests of listed files that another writer wrote (the hf/ export)."""
        for name in names:
            self.files[name] = data.digest(data.confined(self.path, name))
        self._save()

    def verify(self, name, what="file"):
        """Raise data.CorruptFile naming the file unless it has the length and SHA-256 recorded when it
        was written (a file listed without them, by an older train.py, is taken as it is)."""
        if self.files.get(name):
            data.verify(self.join(name), self.files[name], what)

    def remove(self, *names):
        """Delete listed files (and the folders they leave empty), then unlist them. Every path is
        checked before the first is deleted."""
        paths = [data.confined(self.path, name.rstrip("/")) for name in names]
        for name, path in zip(names, paths):
            if name.endswith("/") and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with suppress(FileNotFoundError):
                    os.remove(path)
            parent = os.path.dirname(name.rstrip("/"))
            while parent:
                with suppress(OSError):  # not empty: something else is still in it
                    os.rmdir(self.join(parent))
                parent = os.path.dirname(parent)
        self.forget(*names)

    def move(self, names, folder):
        """Move listed files into the subfolder `folder`, keeping their relative names and digests."""
        moved = {name: os.path.join(folder, name) for name in names}
        paths = {name: (data.confined(self.path, old.rstrip("/")), data.confined(self.path, new.rstrip("/")))
                 for name, (old, new) in zip(moved, moved.items())}
        self.claim(*moved.values())
        for old, (src, dst) in paths.items():
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with suppress(FileNotFoundError):
                os.rename(src, dst)
            self.files[moved[old]] = self.files.get(old)
        self.forget(*moved)

    def checkpoints(self):
        """[(step, name)] of the checkpoints train.py wrote at the top of the folder, oldest first."""
        return sorted((int(m[1]), n) for n in self.files if (m := CHECKPOINT_NAME.fullmatch(n)) and os.path.exists(self.join(n)))

    def prune(self, keep, healthy_before):
        """Delete all but the newest `keep` checkpoints, never the one with the best validation loss
        nor the newest one from before step `healthy_before` (where a divergence began)."""
        ckpts = [name for _, name in self.checkpoints()]
        kept = set(ckpts[-keep:])
        if before := [name for step, name in self.checkpoints() if step < healthy_before]:
            kept.add(before[-1])
        if scored := [(self.val_losses[n], n) for n in ckpts if self.val_losses.get(n) is not None
                      and math.isfinite(self.val_losses[n])]:
            kept.add(min(scored)[1])
        self.remove(*[name for name in ckpts if name not in kept])


def _manifest_digest(manifest):
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def open_run_folder(args, setup, command):
    """--out, checked and locked by rank 0; every rank stops with rank 0's line when it may not be used."""
    folder = RunFolder(args.out, exempt=[args.data_cache])
    problem = folder.take(command) if setup.master else None
    if setup.distributed:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        fail(problem)
    return folder


# -----------------------------------------------------------------------------
# Metrics: appended line by line, verified up to a checkpoint on resume

def _line(record):
    return (json.dumps(record) + "\n").encode()


class MetricsLog:
    """metrics.jsonl: each record appended (rank 0) as soon as it is made, so that a kill loses at most
    the line being written; a running length and SHA-256 of the file, which each checkpoint records so
    that a resume verifies the records it keeps."""

    def __init__(self, folder, records, master):
        self.path, self.records, self.master = folder.join(METRICS), records, master
        self.hash, self.bytes = hashlib.sha256(), 0
        for record in records:
            self._count(_line(record))

    def _count(self, line):
        self.hash.update(line)
        self.bytes += len(line)

    def write(self, record):
        self.records.append(record)
        line = _line(record)
        if self.master:
            try:
                with open(self.path, "ab") as f:
                    f.write(line)
            except OSError as e:  # a full disk names no file: name it
                raise OSError(e.errno, e.strerror, self.path) from e
        self._count(line)

    def digest(self):
        return {"bytes": self.bytes, "sha256": self.hash.hexdigest()}


def read_metrics(path, upto_step, expected=None, after=False):
    """The records of steps <= upto_step (> upto_step when `after`). With `expected` (the digest a
    checkpoint recorded of the metrics written before it), exactly the records it covers, verified;
    without, any line cut short by a kill is dropped."""
    if not os.path.exists(path):
        if expected and expected["bytes"]:
            raise data.CorruptFile(f"{path} is missing, but {expected['bytes']} bytes were written before the checkpoint")
        return []
    with open(path, "rb") as f:
        raw = f.read()
    if expected and not after:
        head = raw[:expected["bytes"]]
        if len(head) < expected["bytes"] or hashlib.sha256(head).hexdigest() != expected["sha256"]:
            raise data.CorruptFile(f"{path} fails its check: the {expected['bytes']} bytes written before the "
                                   f"checkpoint were cut short or changed")
        return [json.loads(line) for line in head.splitlines()]
    records = []
    for line in raw.splitlines():
        with suppress(ValueError, KeyError, TypeError):
            record = json.loads(line)
            if (record["step"] > upto_step) == after:
                records.append(record)
    return records


def check_run_folder(args, folder, ckpt, ckpt_path):
    """The checks on --out before anything is written there; returns the metrics records a resume keeps,
    verified against the digest its checkpoint recorded. A folder that holds an earlier run is never
    reused silently: --resume continues it, --overwrite deletes what train.py wrote there first."""
    earlier = folder.checkpoints()
    if earlier and not (args.resume or args.overwrite):
        fail(f"--out {args.out} holds an earlier run (checkpoints up to {earlier[-1][1]}): "
             f"continue it with --resume, start over with --overwrite, or choose another --out")
    from_elsewhere = ckpt and os.path.realpath(os.path.dirname(ckpt_path) or ".") != os.path.realpath(args.out)
    if from_elsewhere and folder.files:
        fail(f"--resume {ckpt_path}: a checkpoint of another run folder, and --out {args.out} holds a run of its "
             f"own: resume into a new --out")
    if not ckpt or from_elsewhere:
        return []
    try:
        return read_metrics(folder.join(METRICS), ckpt["step"], ckpt.get("metrics"))
    except ValueError as e:  # data.CorruptFile, or a line that is not JSON
        fail(f"--resume: {e}; to continue without the earlier metrics, resume into a new --out: "
             f"--resume {ckpt_path} --out NEW")


def prepare_run_folder(args, folder, ckpt, ckpt_path, records, run_config, setup):
    """Make --out ready (rank 0), after check_run_folder: what a resume from an older checkpoint would
    replace (newer checkpoints, their metrics, plot and hf/ export) is moved into a subfolder, never
    deleted; metrics.jsonl keeps `records`; config.json is written."""
    if not setup.master:
        return
    earlier, step = folder.checkpoints(), ckpt["step"] if ckpt else 0
    with naming(f"--out {args.out}"):
        folder.remove(*[n for n in folder.names() if n.endswith(".tmp") and folder.ours(n)])  # a kill's leftovers
        if args.overwrite:
            folder.remove(*folder.files)
        if ckpt and (newer := [name for s, name in earlier if s > step]):
            aside, tries = f"after_step_{step}", 1
            while os.path.exists(folder.join(aside)):  # resumed from this step before
                aside, tries = f"after_step_{step}_{tries + 1}", tries + 1
            later = read_metrics(folder.join(METRICS), step, after=True)
            folder.write(os.path.join(aside, METRICS), lambda f: f.writelines(map(_line, later)), mode="wb")
            folder.move([*newer, *sorted(n for n in folder.files if n == "plot.png" or n.startswith("hf/"))], aside)
            setup.log(f"--resume {ckpt_path}: the newer checkpoints ({', '.join(newer)}) and their metrics, plot and "
                      f"export are kept in {folder.join(aside)}")
        folder.write(METRICS, lambda f: f.writelines(map(_line, records)), mode="wb")
        folder.files[METRICS] = None  # appended from now on: verified through the checkpoints' digests
        folder.write("config.json", lambda f: json.dump(run_config, f, indent=2))


# -----------------------------------------------------------------------------
# Checkpoints

def rng_state():
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    np_kind, np_keys, *rest = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), *rest))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_checkpoint(ckpt, folder, keep, val_loss=None, healthy_before=math.inf):
    """Write ckpt_<step>.pt atomically (temporary file, fsync, rename: a kill at any moment leaves every
    checkpoint whole), record its digest and validation loss, then prune (`RunFolder.prune`). A failed
    write (a full disk) removes the temporary file and stops with one line naming the path; a model
    with non-finite weights is never written."""
    if not all(torch.isfinite(v).all() for v in ckpt.get("model", {}).values() if v.is_floating_point()):
        fail(f"step {ckpt['step']}: the model holds non-finite weights; not checkpointing it")
    name = f"ckpt_{ckpt['step']:07d}.pt"
    try:
        folder.val_losses[name] = val_loss
        folder.write(name, lambda f: torch.save(ckpt, f), mode="wb")
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write as RuntimeError("... unexpected pos ...") raised while
        # handling the OSError that says what happened
        cause = e if isinstance(e, OSError) else e.__context__
        if isinstance(cause, OSError):
            fail(f"--out {folder.path}: cannot write checkpoint {folder.join(name)}: {cause.strerror or cause}")
        raise
    folder.prune(keep, healthy_before)
    return folder.join(name)


def load_checkpoint(path, expected=None):
    """A train.py checkpoint, memory-mapped. Verified first: against `expected` (its length and SHA-256
    as recorded in its folder's manifest) when given, else against the CRC-32 that torch.save's zip
    archive stores for each record (torch.load reads neither). ValueError names what is wrong."""
    if expected:
        data.verify(path, expected, "checkpoint")
    else:
        try:
            with zipfile.ZipFile(path) as archive:
                corrupt = archive.testzip()
        except OSError as e:
            raise ValueError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
        except Exception:  # zipfile's errors for an empty, cut or foreign file are many kinds
            raise ValueError(f"cannot read checkpoint {path}: not a whole checkpoint (empty, cut short, or not a zip "
                             f"archive)") from None
        if corrupt:
            raise ValueError(f"cannot read checkpoint {path}: corrupt bytes (record {corrupt} fails its CRC-32 check)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a whole zip archive that is not a torch.save file
        raise ValueError(f"cannot read checkpoint {path}: a zip archive, but not one torch.save wrote") from None
    missing = CHECKPOINT_KEYS - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise ValueError(f"{path} is not a train.py checkpoint (missing {', '.join(sorted(missing))})")
    return ckpt


def read_checkpoint(path, option):
    """load_checkpoint verified against the digest its folder's manifest recorded, if any; a corrupt or
    unreadable one stops the run, naming it and the newest older checkpoint next to it that reads."""
    folder = RunFolder(os.path.dirname(path) or ".")
    if folder.problem:
        fail(f"{option} {path}: {folder.problem}")
    try:
        return load_checkpoint(path, folder.files.get(os.path.basename(path)))
    except ValueError as e:
        fail(f"{option}: {e}{older_checkpoint_hint(path, option)}")


def older_checkpoint_hint(bad, option):
    folder = RunFolder(os.path.dirname(bad) or ".")
    for path in sorted(glob.glob(os.path.join(folder.path, "ckpt_*.pt")), reverse=True):
        if os.path.basename(path) < os.path.basename(bad):
            with suppress(ValueError):
                step = load_checkpoint(path, folder.files.get(os.path.basename(path)))["step"]
                return f"; the older checkpoint next to it reads (step {step}): {option} {path}"
    return ""


def open_checkpoint(args):
    """(checkpoint, path) that --resume names, read and verified before anything is built."""
    if args.resume == "latest":
        folder = RunFolder(args.out)
        if problem := folder.refusal():
            fail(problem)
        if not (ckpts := folder.checkpoints()):
            fail(f"--resume: no checkpoint in --out {args.out}")
        path = os.path.join(args.out, ckpts[-1][1])
    else:
        path = args.resume
        if not os.path.isfile(path):
            fail(f"--resume: no such checkpoint: {path}")
    return read_checkpoint(path, "--resume"), path


def open_init_source(args):
    """(checkpoint, its record for config.json: path, step, length and SHA-256) that --init-from names,
    read and verified before anything is built."""
    path = args.init_from
    if not os.path.isfile(path):
        fail(f"--init-from: no such checkpoint: {path}")
    if os.path.realpath(os.path.dirname(path) or ".") == os.path.realpath(args.out):
        fail(f"--init-from {path}: a checkpoint of --out {args.out} itself; fine-tune into a new --out")
    ckpt = read_checkpoint(path, "--init-from")
    return ckpt, {"path": os.path.abspath(path), "step": ckpt["step"], **data.digest(path)}


def check_same_shapes(config, source, args):
    """--init-from: stop, naming the --set field and the weight, unless every weight of the source
    checkpoint keeps its shape in this run's model (shapes compared on the meta device: nothing allocated)."""
    def shapes(cfg):
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in KimiK2(cfg).state_dict().items()}

    saved = {k: tuple(v.shape) for k, v in source["model"].items()}
    if shapes(config) == saved:
        return
    base = Config(**source["config"]["model"])
    for field, value in args.set:
        ours = saved
        with suppress(ValueError, TypeError):  # a field valid only together with another --set
            ours = shapes(Config(**{**base.to_dict(), field: value}))
        if ours != saved:
            name = next(k for k in sorted(saved.keys() | ours.keys()) if saved.get(k) != ours.get(k))
            fail(f"--set {field}={value}: changes {name} from {saved.get(name)} to {ours.get(name)}; --init-from "
                 f"keeps the shapes of {args.init_from} (set only fields that keep them)")
    fail(f"--init-from {args.init_from}: the --set fields together change the shapes of its weights")


def check_resume(ckpt, path, current):
    """Stop, naming the first differing field, when the checkpoint's run is not this run's beginning."""
    saved = ckpt["config"]
    for key in RESUME_MUST_MATCH:
        if key == "model":
            fields = [f for f in current["model"] if saved["model"].get(f) != current["model"][f]]
            if fields:
                f = fields[0]
                fail(f"--resume: {path} was trained with a different --preset/--config: {f} "
                     f"{saved['model'].get(f)!r} (this run: {current['model'][f]!r})"
                     + (f", and {len(fields) - 1} more field(s)" if len(fields) > 1 else ""))
        elif saved.get(key) != current.get(key):
            option = "--" + key.replace("_", "-")
            fail(f"--resume: {path} was trained with a different {option} ({saved.get(key)!r}, this run: {current.get(key)!r})")
    if ckpt["step"] > current["max_steps"]:
        fail(f"--resume: {path} is at step {ckpt['step']}, past --max-steps {current['max_steps']} "
             f"(give --max-steps {ckpt['step']} or more)")


# -----------------------------------------------------------------------------
# Export and plot

def export_hf(model_state, config, folder):
    """hf/: the final model and the byte tokenizer in the Hugging Face layout (AutoModelForCausalLM
    and AutoTokenizer load it); returns the plain, unsharded model."""
    export = KimiK2(config)
    export.load_state_dict(model_state)
    folder.claim("hf/")  # the writers choose the file names: the folder is claimed whole until they are listed
    with naming(f"the Hugging Face export {folder.join('hf')}"):
        export.save_pretrained(folder.join("hf"))
        data.ByteTokenizer().save_pretrained(folder.join("hf"))
    names = [name for name in folder.names() if name.startswith("hf" + os.sep)]
    folder.claim(*names)
    folder.record(*names)
    folder.forget("hf/")
    return export


def pyplot(what):
    """matplotlib.pyplot on the file-only Agg backend, or None after a one-line hint: matplotlib is
    optional (requirements.txt leaves it out)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no {what}: pip install matplotlib to get it")
        return None
    return plt


def plot_metrics(records, tau, folder):
    """plot.png: losses, max logits per layer, heads clipped, load imbalance."""
    if (plt := pyplot("plot.png")) is None:
        return
    train = [r for r in records if "loss" in r and "skipped" not in r]
    val = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    ax[0, 0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    ax[0, 0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
    ax[0, 0].set(title="loss (nats/token)", xlabel="step")
    ax[0, 0].legend()
    per_layer = np.array([r["max_logit_per_layer"] for r in train])
    for layer in range(per_layer.shape[1] if per_layer.ndim == 2 else 0):
        ax[0, 1].plot([r["step"] for r in train], per_layer[:, layer], label=f"layer {layer}")
    if tau:
        ax[0, 1].axhline(tau, color="k", linestyle="--", label=f"tau = {tau:g}")
    ax[0, 1].set(title="max attention logit per layer (forward pass, before QK-Clip)", xlabel="step")
    ax[0, 1].legend(fontsize=7)
    ax[1, 0].plot([r["step"] for r in train], [r["heads_clipped"] for r in train])
    ax[1, 0].set(title="heads clipped (per log interval)", xlabel="step")
    ax[1, 1].plot([r["step"] for r in train], [r["load_imbalance"] for r in train])
    ax[1, 1].set(title="expert load imbalance (max/mean, worst layer)", xlabel="step")
    fig.tight_layout()
    with naming(folder.join("plot.png")):
        folder.write("plot.png", lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)


# -----------------------------------------------------------------------------
# Signals and the error boundary

class Interrupted(BaseException):
    """A signal that stops the program where it is (outside the loop's step boundary)."""

    def __init__(self, signum, where):
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")


class StopSignals:
    """SIGINT (Ctrl-C), SIGTERM and SIGHUP for the whole program. In the loop (`polled`), a signal asks
    it to stop at the next step boundary, after a checkpoint; a second SIGINT stops at once, except
    during a checkpoint write (`held`), which completes first. Anywhere else a signal stops the
    program at once (Interrupted) with one line: `where` says what was stopped and how to go on."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __enter__(self):
        self.received, self.urgent, self.mode = None, False, "now"
        self.where = "before any update: nothing to keep; rerun the same command"
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        again = self.received is not None
        self.received = self.received or signum  # torchrun follows a Ctrl-C with SIGTERM: keep the first
        if self.mode == "now":
            raise Interrupted(self.received, self.where)
        if again and signum == signal.SIGINT:
            self.urgent = True
            if self.mode == "polled":
                raise Interrupted(signum, "at once (a second Ctrl-C): the steps since the last checkpoint are lost; "
                                          "continue with --resume")

    @contextmanager
    def polled(self):
        self.mode = "polled"
        try:
            yield
        finally:
            self.mode = "now"

    @contextmanager
    def held(self):
        """Changes no signal interrupts halfway (a checkpoint write: inside torch.save a KeyboardInterrupt
        became a torch error; the run folder's moves): a signal takes effect when they are done."""
        mode, self.mode = self.mode, "held"
        try:
            yield
        finally:
            self.mode = mode
        if self.urgent:
            raise Interrupted(signal.SIGINT, "at once (a second Ctrl-C), after the checkpoint being written: "
                                             "continue with --resume")
        if self.received and mode == "now":
            raise Interrupted(self.received, self.where)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def agreed(self, setup):
        """Whether to stop now. Under torchrun every rank must stop at the same step, so the ranks
        agree: one rank's signal stops all of them."""
        stop = torch.tensor(float(self.received is not None), device=setup.device)
        if setup.distributed:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        return bool(stop)


def command_line(world, argv):
    launcher = ["torchrun", f"--nproc_per_node={world}"] if world > 1 else ["python"]
    return shlex.join([*launcher, "train.py", *argv])


def resume_command(world, ckpt_path):
    """The command line that continues this run from ckpt_path: this one with --resume CKPT instead of
    --resume/--overwrite."""
    argv, kept = sys.argv[1:], []
    i = 0
    while i < len(argv):
        if argv[i] == "--resume" and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            i += 1  # its CKPT
        elif not (argv[i] in ("--resume", "--overwrite") or argv[i].startswith("--resume=")):
            kept.append(argv[i])
        i += 1
    return command_line(world, [*kept, "--resume", ckpt_path])


def _saved_traceback():
    """The current exception's traceback in a new file of the temporary folder, or why it could not be saved."""
    try:
        fd, path = tempfile.mkstemp(prefix="train.py-error-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            traceback.print_exc(file=f)
        return f"traceback in {path}"
    except OSError as e:
        return f"traceback not saved: {e.strerror}"


def error_boundary(main, argv=None):
    """train.py's one error boundary: run main(argv); a refusal (SystemExit) passes as it is, a
    signal ends in one line and status 130, anything else in one line naming the file or option and
    the saved traceback (status 1)."""
    try:
        return main(argv)
    except Interrupted as e:
        message, code = f"train.py: {e}", INTERRUPTED
    except KeyboardInterrupt:  # before the handlers were installed
        message, code = "train.py: interrupted", INTERRUPTED
    except Exception as e:
        notes = [n.removeprefix("train.py: ") for n in getattr(e, "__notes__", []) if n.startswith("train.py: ")]
        if isinstance(e, OSError) and e.filename is not None:
            what = f"{e.filename}: {e.strerror}"
        else:
            what = f"{notes[0] if notes else 'unexpected error'}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        message, code = f"train.py: error: {what} ({_saved_traceback()})", 1
    with suppress(OSError):
        print(message, file=sys.stderr, flush=True)
    raise SystemExit(code)
