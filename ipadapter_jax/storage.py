"""Run outputs on a local disk or an object store (gs://, s3://), through one set of functions.

Local files are written atomically (a temporary file beside, then os.replace); remote URIs are
kept as they are and go through `etils.epath`, the layer Orbax uses too, and its fsspec
filesystems. Every path is checked first (`check_path`): a malformed URL is refused instead of
becoming a local folder named `gs:`.

An output never replaces what its command did not write (`check_output`): each output folder
gets a marker file (`MARKER`) naming the command and listing the files it wrote, and an existing
folder is replaced only when that marker accounts for everything in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import uuid

from etils import epath

MARKER = ".ipadapter_jax"
SCHEMES = ("gs", "s3")  # written by epath's filesystems and by Orbax's tensorstore alike
_PARTIAL = ".partial-"  # the temporary names of writes under way
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_BUCKET = re.compile(r"[a-z0-9]([a-z0-9._-]*[a-z0-9])?")


def is_remote(path) -> bool:
  """Whether `path` is a URI with a scheme (gs://bucket/run), not a local path."""
  return "://" in os.fspath(path)


def check_path(path, flag: str | None = None) -> str:
  """`path` as a string; raises ValueError (one line) for a malformed URL or another scheme
  than gs:// and s3://. A local path whose first name holds a colon is written ./name."""
  text = os.fspath(path)
  name = f"{flag} {text}" if flag else text
  if not text:
    raise ValueError(f"{flag or 'path'}: empty path")
  match = _SCHEME.match(text)
  if match is None:
    return text
  scheme, rest = match.group(1), text[match.end() :]
  local = f"; a local path: write ./{text}"
  supported = ", ".join(f"{s}://" for s in SCHEMES)
  if scheme.lower() not in SCHEMES:
    raise ValueError(f"{name}: unsupported URL scheme '{scheme}:' (supported: {supported}{local})")
  if scheme not in SCHEMES or not rest.startswith("//"):
    raise ValueError(f"{name}: malformed URL: write {scheme.lower()}://BUCKET/PATH{local}")
  bucket, _, key = rest[2:].partition("/")
  if not _BUCKET.fullmatch(bucket):
    raise ValueError(f"{name}: {bucket!r} is not a bucket name: write {scheme}://BUCKET/PATH")
  if key and "" in key.rstrip("/").split("/"):
    raise ValueError(f"{name}: malformed URL: an empty name between two '/'")
  return text


def resolve(path, flag: str | None = None) -> str:
  """A local path made absolute; a remote URI unchanged; either checked by `check_path`."""
  path = check_path(path, flag)
  return path if is_remote(path) else os.path.abspath(path)


def join(path, *parts) -> str:
  """`path` joined with `parts`, with "/" for URIs whatever the local separator."""
  path = os.fspath(path)
  return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def _fs(path):
  """The fsspec filesystem epath uses for a URI (one instance, so one listing cache)."""
  return epath.backend.fsspec_backend.fs(path)


def check_reachable(path) -> None:
  """Raises ValueError (one line) when `path`'s filesystem cannot be used from here: a gs://
  URI needs gcsfs (`pip install -e ".[gcs]"`), s3:// needs s3fs."""
  try:
    epath.Path(path).exists()
    if is_remote(path):
      _fs(path)
  except ImportError as e:
    raise ValueError(
      f"{path}: this filesystem needs a package that is not installed "
      f"({' '.join(str(e).split())[:200]})"
    ) from None


def makedirs(path) -> None:
  """Creates a folder and its parents; an existing one is fine."""
  epath.Path(check_path(path)).mkdir(parents=True, exist_ok=True)


def exists(path) -> bool:
  return epath.Path(path).exists()


def isdir(path) -> bool:
  return epath.Path(path).is_dir()


def listdir(path) -> list[str]:
  """The names in a folder, sorted."""
  return sorted(p.name for p in epath.Path(path).iterdir())


def remove(path) -> None:
  """Deletes a file or a folder tree, if there is one."""
  if isdir(path):
    epath.Path(path).rmtree()
  elif exists(path):
    epath.Path(path).unlink()


def size(path) -> int:
  """Bytes in a file, or in every file below a folder."""
  if is_remote(path):
    fs = _fs(path)
    return int(fs.du(path) if fs.isdir(path) else fs.info(path)["size"])
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path) for f in names)


def read_text(path) -> str:
  return epath.Path(path).read_text()


def write_text(path, text: str) -> None:
  """Writes a UTF-8 text file (atomically when local)."""
  write_bytes(path, text.encode())


def write_bytes(path, data: bytes) -> None:
  """Writes a file whole: locally through a temporary file; remotely in one upload, which
  the object store makes visible only once complete (an open file would be committed with
  what it holds when an error interrupts it)."""
  path = check_path(path)
  if is_remote(path):
    _fs(path).pipe_file(path, data)
    return
  with staged(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)


def append_text(path, text: str) -> None:
  """Adds `text` at the end of a file, which is created when missing."""
  path = check_path(path)
  if is_remote(path):
    # Object stores cannot append: the object is rewritten whole.
    write_text(path, (read_text(path) if exists(path) else "") + text)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    f.write(text)


# ----- Outputs that never replace what they did not write -----------------------------------


def _files(path) -> list[str]:
  """Every file (or link) below a folder, as "/"-separated relative paths; the temporary
  folders of writes under way are left out."""
  if is_remote(path):
    fs = _fs(path)
    root = fs._strip_protocol(path).rstrip("/")  # pylint: disable=protected-access
    found = (p[len(root) + 1 :] for p in fs.find(root))
  else:
    found = []
    for top, dirs, names in os.walk(path):
      dirs[:] = [d for d in dirs if not d.startswith(_PARTIAL)]
      links = [d for d in dirs if os.path.islink(os.path.join(top, d))]
      found += [
        os.path.relpath(os.path.join(top, n), path).replace(os.sep, "/") for n in names + links
      ]
  return sorted(p for p in found if p and not p.endswith("/") and not p.startswith(_PARTIAL))


def _read_marker(path, marker: str) -> dict | None:
  try:
    meta = json.loads(read_text(join(path, marker)))
  except (OSError, ValueError, UnicodeDecodeError):
    return None
  return meta if isinstance(meta, dict) else None


def _same_command(recorded: str, command: str) -> bool:
  """Whether `recorded` is `command`, perhaps with flags after it."""
  return recorded == command or recorded.startswith(command + " ")


def _not_its_own(path, command: str, marker: str) -> str | None:
  """What in the existing folder `path` keeps `command` from replacing it (None: nothing)."""
  top = [n for n in listdir(path) if not n.startswith(_PARTIAL)]
  if not top:
    return None
  meta = _read_marker(path, marker)
  if meta is None:  # the common case: a user's folder, which may be large, is not walked
    more = f" and {len(top) - 3} more" if len(top) > 3 else ""
    return f"holds {', '.join(map(repr, top[:3]))}{more}, which {command} did not write"
  recorded = str(meta.get("command", ""))
  if not _same_command(recorded, command):
    return f"holds the output of another command ({recorded or 'unnamed'})"
  # The toy weights' MANIFEST.json lists its files as the keys of "sha256".
  listed = set(meta.get("files") or meta.get("sha256") or ())
  foreign = [f for f in _files(path) if f != marker and f not in listed]
  if foreign:
    return f"holds {foreign[0]!r}, which {command} did not write there"
  return None


def check_output(
  path,
  command: str,
  *,
  folder: bool = True,
  flag: str = "--out",
  overwrite: bool = False,
  marker: str = MARKER,
  name: str | None = None,
) -> str:
  """`path` resolved, once sure that writing `command`'s output there destroys nothing else;
  raises ValueError (one line) otherwise.

  A folder output may take the place of nothing, of an empty folder, or of a folder whose
  `marker` says `command` wrote every file in it. A file output replaces a file only with
  `overwrite`. `name` describes the path in the message (default: the flag and the path).
  """
  path = resolve(path, flag)
  if is_remote(path):
    check_reachable(path)
    if not path.split("://", 1)[1].partition("/")[2].strip("/"):
      raise ValueError(
        f"{flag} {path}: a bucket itself cannot be an output: write {path.rstrip('/')}/NAME"
      )
  name = name or f"{flag} {path}"
  if not exists(path):
    return path
  if folder:
    if not isdir(path):
      raise ValueError(f"{name} is a file, not a folder: choose another {flag}")
    problem = _not_its_own(path, command, marker)
    if problem:
      raise ValueError(
        f"{name}: this folder {problem}; it is left as it is: choose another "
        f"{flag} (a new or empty folder)"
      )
  elif isdir(path):
    raise ValueError(f"{name} is a folder: choose another {flag}")
  elif not overwrite:
    raise ValueError(f"{name} exists: pass --overwrite to replace it, or choose another {flag}")
  return path


def _write_marker(folder: str, command: str) -> None:
  files = [f for f in _files(folder) if f != MARKER]
  with open(os.path.join(folder, MARKER), "w") as f:
    json.dump({"written_by": "ipadapter_jax", "command": command, "files": files}, f, indent=2)


@contextlib.contextmanager
def staged(
  path,
  command: str | None = None,
  *,
  folder: bool = True,
  flag: str = "--out",
  overwrite: bool = False,
  marker: str = MARKER,
):
  """Yields a local path for any local writer; the file or folder becomes `path` on success,
  and exists when the block ends.

  With `command`, `path` must pass `check_output` (before the writer runs and again before the
  result takes its place), and a folder gets `marker` listing its files (a writer with its own
  marker, another name, writes it itself).
  """
  checks = dict(folder=folder, flag=flag, overwrite=overwrite, marker=marker)
  path = check_output(path, command, **checks) if command else resolve(path)

  def finish(tmp):
    if command and os.path.isdir(tmp) and marker == MARKER:
      _write_marker(tmp, command)
    if command:
      check_output(path, command, **checks)  # a long write: the place may have changed

  if not is_remote(path):
    with atomic_path(path, last=marker) as tmp:
      yield tmp
      finish(tmp)
  else:
    tmp_dir = tempfile.mkdtemp(prefix="staged-")
    tmp = os.path.join(tmp_dir, posixpath.basename(path.rstrip("/")))
    try:
      yield tmp
      if not os.path.exists(tmp):
        raise FileNotFoundError(f"{tmp}: nothing was written to upload to {path}")
      finish(tmp)
      _upload_and_commit(tmp, path.rstrip("/"), last=marker)
    finally:
      shutil.rmtree(tmp_dir, ignore_errors=True)
    _fs(path).invalidate_cache()  # listings cached before the copy would miss it
  if not exists(path):  # so that "wrote PATH" is never printed for nothing
    raise OSError(f"{path}: not found after writing it")


def _upload_and_commit(local: str, remote: str, last: str) -> None:
  """Uploads under a temporary sibling name, then copies each object to its final name (the
  object store's own copy, `last` last) and deletes the temporary one: an upload that fails
  part way leaves nothing under `remote`, and what a failed copy left there is removed."""
  fs = _fs(remote)
  parent, base = remote.rsplit("/", 1)
  temporary = f"{parent}/{_PARTIAL}{uuid.uuid4().hex[:8]}-{base}"
  if os.path.isdir(local):
    files = sorted(
      (
        os.path.relpath(os.path.join(d, n), local).replace(os.sep, "/")
        for d, _, names in os.walk(local)
        for n in names
      ),
      key=lambda f: f == last,
    )
    pairs = [(f"{temporary}/{f}", f"{remote}/{f}") for f in files]
  else:
    files, pairs = [None], [(temporary, remote)]
  committing = False
  try:
    for f in files:
      fs.put_file(
        local if f is None else os.path.join(local, f),
        temporary if f is None else f"{temporary}/{f}",
      )
    # A single object is copied whole or not at all; a folder is many objects.
    committing = os.path.isdir(local)
    if committing and fs.exists(remote):  # checked before: the command's own older output
      fs.rm(remote, recursive=True)
    for source, target in pairs:
      fs.cp_file(source, target)
  except BaseException:
    if committing:
      with contextlib.suppress(Exception):
        fs.rm(remote, recursive=True)
    raise
  finally:
    with contextlib.suppress(Exception):
      fs.rm(temporary, recursive=True)


@contextlib.contextmanager
def atomic_path(path: str, last: str | None = None):
  """A temporary local path for `path` (a file or a folder), which takes its place only when
  the block succeeds: a failed write never leaves a half-written or clobbered result.

  An existing folder keeps its place (a link to it, a shell inside it): the temporary one is
  written inside it and the entries are exchanged, `last` (a marker) moved in last.
  """
  path = os.path.abspath(path)  # also drops a trailing separator
  into = os.path.isdir(path)
  if into:
    path = os.path.realpath(path)  # a link to a folder: the folder it points to is written
  parent = path if into else os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp_dir = tempfile.mkdtemp(prefix=_PARTIAL, dir=parent)
  tmp = os.path.join(tmp_dir, os.path.basename(path))
  try:
    yield tmp
    if not into:
      os.replace(tmp, path)
    elif os.path.isdir(tmp):
      _exchange(tmp, path, os.path.join(tmp_dir, ".previous"), os.path.basename(tmp_dir), last)
    else:
      raise IsADirectoryError(f"{path}: a folder, where a file was written")
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)


def _exchange(new: str, folder: str, aside: str, keep: str, last: str | None) -> None:
  """Replaces the entries of `folder` by those of `new` (`last` leaves first, comes in last);
  on a failure the old entries are put back."""
  os.makedirs(aside)
  old = sorted((n for n in os.listdir(folder) if n != keep), key=lambda n: n != last)
  moved_out, moved_in = [], []
  try:
    for name in old:
      os.replace(os.path.join(folder, name), os.path.join(aside, name))
      moved_out.append(name)
    for name in sorted(os.listdir(new), key=lambda n: n == last):
      os.replace(os.path.join(new, name), os.path.join(folder, name))
      moved_in.append(name)
  except BaseException:
    for name in moved_in:
      target = os.path.join(folder, name)
      (shutil.rmtree if os.path.isdir(target) and not os.path.islink(target) else os.remove)(target)
    for name in moved_out:
      os.replace(os.path.join(aside, name), os.path.join(folder, name))
    raise
