"""Runs inside the code-node sandbox process (python -I -S): install the guards, run `main(**inputs)`.

Reads ``{"code", "inputs", "run_dir", "read_roots"}`` as JSON on stdin and writes one JSON line
``{"ok": true, "outputs": ...}`` or ``{"ok": false, "error": ...}`` to the original stdout. The user's
prints go to stderr. An audit hook (PEP 578) refuses sockets, process creation, ctypes and file access
outside the run directory (reads are also allowed under the Python installation, for imports). This
layer is in-process; the kernel-level limits (network namespace, rlimits, unprivileged user) are set
by the parent before exec.
"""

import json
import os
import sys

_PROCESS_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
    "os.kill", "os.killpg", "pty.spawn", "sys.addaudithook", "os.startfile",
})
_LIST_EVENTS = frozenset({"os.listdir", "os.scandir"})  # importlib lists the stdlib directories
_PATH_EVENTS = frozenset({
    "os.chdir", "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink",
    "os.link", "os.chmod", "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "os.chroot",
})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _inside(path, roots):
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r + os.sep) for r in roots)


def _make_hook(run_dir, read_roots):
    write_roots = (run_dir,)
    read_ok = (run_dir, *read_roots)

    def hook(event, args):
        if event.startswith(("socket.", "ctypes.")) or event in _PROCESS_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int) or path is None:
                return
            writing = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & _WRITE_FLAGS)
            if not _inside(os.fsdecode(path), write_roots if writing else read_ok):
                raise PermissionError(f"sandbox: access to {os.fsdecode(path)!r} is outside the run directory")
        elif args and isinstance(args[0], (str, bytes, os.PathLike)):
            roots = read_ok if event in _LIST_EVENTS else write_roots if event in _PATH_EVENTS else None
            if roots and not _inside(os.fsdecode(args[0]), roots):
                raise PermissionError(f"sandbox: {event} on {os.fsdecode(args[0])!r} is outside the run directory")

    return hook


def main():
    request = json.loads(sys.stdin.read())
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # user prints land on stderr, the result alone on the saved stdout
    sys.stdout = sys.stderr
    run_dir = os.path.realpath(request["run_dir"])
    os.chdir(run_dir)
    sys.addaudithook(_make_hook(run_dir, tuple(os.path.realpath(r) for r in request["read_roots"])))
    try:
        namespace = {"__name__": "__sandbox__"}
        exec(compile(request["code"], "<code node>", "exec"), namespace)
        result = namespace["main"](**request["inputs"])
        if not isinstance(result, dict):
            raise TypeError(f"main() must return a dict, got {type(result).__name__}")
        line = json.dumps({"ok": True, "outputs": result})
    except BaseException as exc:  # the user's failure, whatever it is, becomes the node's error
        line = json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    out.write(line + "\n")
    out.flush()


if __name__ == "__main__":
    main()
