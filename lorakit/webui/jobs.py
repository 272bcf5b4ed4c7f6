"""Run lorakit commands as separate processes, one job at a time, with their output in a log file.

A job is one or more commands run one after another (an eval of the checkpoint, then of its base).
Each process gets an argument list (never a shell string) and a session of its own, so closing the
page (or the browser) leaves it running; Stop interrupts it the way Ctrl-C would. A job's record
(`job.json`: commands, pid, times, exit status) and its output (`log.txt`) sit in a folder under
`<output_dir>/webui-jobs/`, so a reloaded page, or a restarted web UI, finds it again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from lorakit.errors import UserError
from lorakit.webui.commands import Command

STOP_GRACE_S = 15  # after Ctrl-C (SIGINT), how long a process may take to save and leave before it is killed


@dataclass
class Job:
    """One job: what it runs and how it went."""

    id: str
    kind: str
    "train, eval or export."
    commands: list[list[str]]
    "Each command as typed: ['lorakit', 'sft', '--flag', 'value', ...]."
    folder: str
    started: float
    pid: int | None = None
    returncode: int | None = None
    ended: float | None = None
    stopped: bool = False
    "Stopped from the page (not a failure)."
    current: int = 0
    "Index of the command running (or that ran last)."

    @property
    def log_path(self) -> Path:
        return Path(self.folder) / "log.txt"

    def text(self) -> str:
        """The commands as typed in a terminal, one per line."""
        return "\n".join(Command(c[1], c[2:]).text() for c in self.commands)

    def save(self) -> None:
        path = Path(self.folder) / "job.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, folder: Path) -> Job:
        return cls(**json.loads((folder / "job.json").read_text(encoding="utf-8")))

    @property
    def running(self) -> bool:
        if self.ended is not None:
            return False
        return self.pid is not None and _alive(self.pid)

    def log(self) -> str:
        """The output so far, carriage returns kept (a progress bar's updates stay on one line)."""
        if not self.log_path.is_file():
            return ""
        with open(self.log_path, encoding="utf-8", errors="replace", newline="") as f:
            return f.read()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobRunner:
    """Starts, watches and stops jobs; at most one runs at a time."""

    def __init__(self, root: Path, *, cwd: Path | None = None):
        self.root = Path(root)
        self.cwd = Path(cwd or Path.cwd())
        self._lock = threading.Lock()
        self._procs: dict[str, subprocess.Popen] = {}
        self._live: dict[str, Job] = {}  # records of the jobs this process watches (their threads update them)

    def jobs(self, kind: str | None = None) -> list[Job]:
        """Every recorded job, newest first."""
        if not self.root.is_dir():
            return []
        found = []
        for folder in sorted(self.root.iterdir(), reverse=True):
            if (folder / "job.json").is_file():
                try:
                    job = self._live.get(folder.name) or Job.load(folder)
                except (ValueError, TypeError):
                    continue  # a record from another version: not ours to show
                if kind is None or job.kind == kind:
                    found.append(job)
        return found

    def active(self) -> Job | None:
        """The job running now, if any (also one started by an earlier web UI process)."""
        return next((j for j in self.jobs() if j.running), None)

    def latest(self, kind: str) -> Job | None:
        jobs = self.jobs(kind)
        return jobs[0] if jobs else None

    def start(self, kind: str, commands: list[Command], env: dict[str, str] | None = None) -> Job:
        """Start `commands` one after another in a background thread; refuse if a job is running."""
        with self._lock:
            busy = self.active()
            if busy is not None:
                raise UserError(f"a {busy.kind} job is running (started {_clock(busy.started)}): "
                                f"{Command(busy.commands[busy.current][1], busy.commands[busy.current][2:]).text()}"
                                f" -- stop it or wait for it to finish.")
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
            folder = self.root / f"{stamp}-{kind}"
            folder.mkdir(parents=True)
            job = Job(id=folder.name, kind=kind, commands=[c.argv() for c in commands], folder=str(folder),
                      started=time.time())
            job.save()
            self._live[job.id] = job
            proc = self._spawn(job, commands[0], env)  # the first process starts now: Start answers with its pid
            thread = threading.Thread(target=self._run, args=(job, commands, env, proc), daemon=True)
            thread.start()
        return job

    def _spawn(self, job: Job, command: Command, env: dict[str, str] | None) -> subprocess.Popen:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        with open(job.log_path, "a", encoding="utf-8") as log:
            log.write(f"$ {command.text()}\n")
            log.flush()
            proc = subprocess.Popen(command.process_argv(), cwd=self.cwd, env=full_env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs[job.id] = proc
        job.pid = proc.pid
        job.save()
        return proc

    def _run(self, job: Job, commands: list[Command], env, proc: subprocess.Popen) -> None:
        for index, command in enumerate(commands):
            if index:
                if job.stopped:
                    break
                job.current = index
                proc = self._spawn(job, command, env)
            job.returncode = proc.wait()
            job.save()
            if job.returncode != 0:
                break
        job.ended = time.time()
        job.save()
        self._procs.pop(job.id, None)
        self._live.pop(job.id, None)

    def stop(self, job: Job) -> None:
        """Interrupt the job's process group like Ctrl-C; kill it if it has not left after STOP_GRACE_S."""
        job = self._live.get(job.id, job)
        job.stopped = True
        job.save()
        if job.pid is not None and _alive(job.pid):
            _signal_group(job.pid, signal.SIGINT)
            threading.Thread(target=_kill_later, args=(job.pid, self._procs.get(job.id)), daemon=True).start()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(os.getpgid(pid), sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_later(pid: int, proc: subprocess.Popen | None) -> None:
    deadline = time.time() + STOP_GRACE_S
    while time.time() < deadline:
        if (proc.poll() is not None) if proc is not None else not _alive(pid):
            return
        time.sleep(0.2)
    _signal_group(pid, signal.SIGKILL)


def _clock(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%H:%M:%S")
