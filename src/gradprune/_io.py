"""Low-level file writing and reading: atomic files, atomic sets of files, loads that name the path.

- :func:`atomic_write` writes one file through a temporary sibling and ``os.replace``.
- :func:`write_file_set` writes several files (or folders) as one set: everything goes into a new
  sibling folder, which is swapped with the target folder only once complete (an atomic exchange
  where the OS offers one, else two renames), so a failure at any point leaves the previous set
  intact and loadable. Entries of the target folder that are not part of the set are kept.
- Temporary names carry the host and process id; a later write removes the ones left by a process
  that no longer runs (e.g. one killed mid-write), and restores a folder a killed swap had moved
  aside. Files and folders get the permissions the umask gives.
- :func:`load_torch` / :func:`load_json` raise ``ValueError`` naming the path of a damaged file.

Example:
    >>> import os, tempfile
    >>> from gradprune._io import write_file_set
    >>> def text(s):
    ...     def write(path):
    ...         with open(path, "w") as fh:
    ...             fh.write(s)
    ...     return write
    >>> with tempfile.TemporaryDirectory() as d:
    ...     write_file_set(d + "/out", {"a.txt": text("1"), "b.txt": text("2")})
    ...     sorted(os.listdir(d + "/out"))
    ['a.txt', 'b.txt']
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shutil
import socket
from typing import Callable, Mapping

__all__ = ["atomic_write", "write_file_set", "load_torch", "load_json", "load_safetensors"]

_TAG = "gradprune-tmp"
_OLD = "gradprune-old"
_NAME_RE = re.compile(r"^\.(?P<base>.+)\.(?P<kind>gradprune-tmp|gradprune-old)-(?P<host>[A-Za-z0-9_.-]+?)"
                      r"-(?P<pid>\d+)-[0-9a-f]{8}$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _temp_name(directory: str, base: str, kind: str = _TAG) -> str:
    return os.path.join(directory, f".{base}.{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: exists, owned by someone else
        return True
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _clean_orphans(directory: str, base: str) -> None:
    """Remove temporaries of ``base`` left in ``directory`` by dead processes on this host; a folder
    moved aside by a killed swap is put back when nothing took its place."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    host = _host()
    for name in names:
        m = _NAME_RE.match(name)
        if not m or m["base"] != base or m["host"] != host or _alive(int(m["pid"])):
            continue
        full, target = os.path.join(directory, name), os.path.join(directory, base)
        if m["kind"] == _OLD and not os.path.lexists(target):
            os.rename(full, target)
        else:
            _remove(full)


def _split(path) -> tuple[str, str, str]:
    path = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(path)
    if not base:
        raise ValueError(f"path must name a file or folder, got {path!r}")
    return path, directory, base


def _create_file(path: str) -> None:
    """Create an empty file with the mode the umask gives (``mkstemp`` would make it 0600)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and move the result over ``path`` only if it succeeded.

    A failure leaves whatever was at ``path`` untouched and no temporary file behind; temporaries
    of a killed earlier write are removed. The file gets the permissions the umask gives.

    Example:
        >>> import tempfile
        >>> from gradprune.config import atomic_write
        >>> with tempfile.TemporaryDirectory() as d:
        ...     atomic_write(d + "/x.txt", lambda tmp: open(tmp, "w").write("hi"))
        ...     open(d + "/x.txt").read()
        'hi'
    """
    path, directory, base = _split(path)
    os.makedirs(directory, exist_ok=True)
    _clean_orphans(directory, base)
    tmp = _temp_name(directory, base)
    _create_file(tmp)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _link_tree(src: str, dst: str) -> None:
    """Hard-link (else copy) ``src`` into a new ``dst``, recursively."""
    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _inside_cwd(path: str) -> bool:
    cwd = os.path.realpath(os.getcwd())
    real = os.path.realpath(path)
    return cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep)


def write_file_set(folder: str | os.PathLike, writers: Mapping[str, Callable[[str], None]]) -> None:
    """Write ``{name: write(path)}`` into ``folder`` as one set (a writer may create a file or a folder).

    All entries are written into a new sibling folder first; a failure there removes it and leaves
    ``folder`` as it was. Then the new folder replaces ``folder`` (other entries of ``folder`` are
    carried over as hard links). When ``folder`` is the working directory (or holds it), the entries
    are moved in one by one instead.

    Example: see the module docstring.
    """
    if os.path.islink(folder):  # replace the folder the link points to, keep the link
        folder = os.path.realpath(folder)
    folder, parent, base = _split(folder)
    for name in writers:
        if not name or os.sep in name or name in (".", ".."):
            raise ValueError(f"file set entry names must be plain file names, got {name!r}")
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"output folder {folder} exists and is not a folder")
    os.makedirs(parent, exist_ok=True)
    _clean_orphans(parent, base)
    stage = _temp_name(parent, base)
    os.mkdir(stage, 0o777)
    try:
        for name, write in writers.items():
            write(os.path.join(stage, name))
        if os.path.isdir(folder):
            if _inside_cwd(folder):  # never swap the folder the process runs in
                for name in writers:
                    _clean_orphans(folder, name)
                    old = os.path.join(folder, name)
                    if os.path.isdir(old) and not os.path.islink(old):
                        aside = _temp_name(folder, name, _OLD)
                        os.rename(old, aside)
                        os.rename(os.path.join(stage, name), old)
                        _remove(aside)
                    else:
                        os.replace(os.path.join(stage, name), old)
                _remove(stage)
                return
            for name in os.listdir(folder):
                if name not in writers and not _NAME_RE.match(name):
                    _link_tree(os.path.join(folder, name), os.path.join(stage, name))
            os.chmod(stage, os.stat(folder).st_mode & 0o7777)
            if _exchange(stage, folder):
                _remove(stage)  # now the previous set
                return
            aside = _temp_name(parent, base, _OLD)
            os.rename(folder, aside)
            os.rename(stage, folder)
            _remove(aside)
        else:
            os.rename(stage, folder)
    except BaseException:
        _remove(stage)
        raise


def _read(path, what: str, read: Callable[[str], object], errors=(Exception,)):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return read(path)
    except errors as exc:
        raise ValueError(f"{path} is not {what} (truncated or damaged?): {exc}") from exc


def load_torch(path: str | os.PathLike, map_location="cpu"):
    """``torch.load(path, weights_only=True)``; a damaged or foreign file raises ``ValueError``
    naming ``path`` (so do :func:`load_json` and :func:`load_safetensors`).

    Example:
        >>> import tempfile, torch
        >>> from gradprune._io import load_torch
        >>> with tempfile.NamedTemporaryFile(suffix=".pt") as f:
        ...     _ = f.write(b"not a checkpoint"); f.flush()
        ...     load_torch(f.name)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ... is not a readable torch file ...
    """
    import torch

    return _read(path, "a readable torch file",
                 lambda p: torch.load(p, map_location=map_location, weights_only=True))


def _read_json(path: str):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def load_json(path: str | os.PathLike):
    """Parse the JSON file ``path``; a truncated or invalid file raises ``ValueError`` naming it.

    Example: like :func:`load_torch`."""
    return _read(path, "valid JSON", _read_json, (ValueError, UnicodeDecodeError))


def load_safetensors(path: str | os.PathLike) -> dict:
    """``safetensors.torch.load_file(path)``; a truncated or foreign file raises ``ValueError``
    naming ``path``.

    Example: like :func:`load_torch`."""
    try:
        import safetensors.torch as st
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("safetensors is needed: pip install 'gradprune[hf]'") from exc
    return _read(path, "a readable safetensors file", st.load_file)
