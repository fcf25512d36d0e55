"""Model folders and weight files on disk or on the Hugging Face hub.

A hub id is one string, "owner/name" for a repository, "owner/name/sub/folder" for a folder in
it and "owner/name/sub/folder/file.safetensors" for a file, or a `HubId` that spells the parts
out (and may pin a revision). A download fetches only the files a loader reads: every loader
passes the file name patterns of what it opens (`model_patterns`).
"""

from __future__ import annotations

import dataclasses
import json
import os

from ipadapter_jax.weights.files import CheckpointError, weight_file_names

# A shard's number as the hub's writers spell it: model-00001-of-00002.safetensors.
SHARD_NUMBER = "-" + "[0-9]" * 5 + "-of-" + "[0-9]" * 5
# What transformers' CLIPTokenizer.from_pretrained opens in a tokenizer folder.
TOKENIZER_FILES = (
  "vocab.json",
  "merges.txt",
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "added_tokens.json",
)


@dataclasses.dataclass(frozen=True)
class HubId:
  """A hub folder (`weight_name` None) or file given by parts, as diffusers'
  `load_ip_adapter(repo_id, subfolder=..., weight_name=...)` takes them; `revision` pins a
  branch, tag or commit (None: the default branch)."""

  repo_id: str
  subfolder: str = ""
  weight_name: str | None = None
  revision: str | None = None

  @property
  def path(self) -> str:
    """The one-string form: owner/name[/subfolder][/weight_name]."""
    return "/".join(p for p in (self.repo_id, self.subfolder.strip("/"), self.weight_name) if p)

  def __str__(self) -> str:
    return f"{self.path} (revision {self.revision})" if self.revision else self.path


def parse_hub_id(text: str, *, file: bool = False, revision: str | None = None) -> HubId:
  """The `HubId` that a string names: a folder, or with `file` a file (at least three parts)."""
  parts = text.rstrip("/").split("/")
  least = 3 if file else 2
  if len(parts) < least or not all(parts) or os.path.isabs(text) or text.startswith((".", "~")):
    kind = (
      "no such file, and not a hub file id (owner/name/[folder/]file)"
      if file
      else "no such folder, and not a hub id (owner/name[/folder])"
    )
    raise CheckpointError(f"{text}: {kind}")
  if file:
    return HubId("/".join(parts[:2]), "/".join(parts[2:-1]), parts[-1], revision)
  return HubId("/".join(parts[:2]), "/".join(parts[2:]), None, revision)


def names_local_or_hub_file(text: str) -> bool:
  """Whether `text` is an existing file or could name a hub file (owner/name/[folder/]file): what
  a command checks before it loads anything, without downloading."""
  if os.path.isfile(text):
    return True
  try:
    parse_hub_id(text, file=True)
  except CheckpointError:
    return False
  return not os.path.exists(text)


def _pinned(hub: HubId, revision: str | None) -> HubId:
  """`hub` with `revision` when it pins none itself; two different pins are refused."""
  if revision is None or hub.revision == revision:
    return hub
  if hub.revision is not None:
    raise CheckpointError(f"{hub}: revision {revision!r} asked as well; give one")
  return dataclasses.replace(hub, revision=revision)


def _download(hub: HubId, fetch):
  """`fetch()`'s result, its failure (offline, not found, gated...) as one CheckpointError."""
  try:
    return fetch()
  except Exception as e:  # the hub client raises many types
    reason = " ".join(str(e).split())  # one line, whatever the hub client printed
    raise CheckpointError(
      f"{hub}: not on this disk, and the hub download failed ({type(e).__name__}: {reason})"
    ) from None


def local_path(
  path_or_id: str | HubId, *, revision: str | None = None, allow_patterns: list[str] | None = None
) -> str:
  """A local folder for `path_or_id`: the path itself, or a hub download of the files matching
  `allow_patterns` (relative to the named folder; None: all of them). `revision` pins a hub
  id's revision."""
  if isinstance(path_or_id, str):
    if os.path.exists(path_or_id):
      return path_or_id
    hub = parse_hub_id(path_or_id, revision=revision)
  else:
    hub = _pinned(path_or_id, revision)
  if hub.weight_name is not None:
    raise CheckpointError(f"{hub}: names a file where a folder is needed")
  subfolder = hub.subfolder.strip("/")
  patterns = allow_patterns or ["*"]
  if subfolder:
    patterns = [f"{subfolder}/{p}" for p in patterns]
  from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel

  root = _download(
    hub, lambda: snapshot_download(hub.repo_id, revision=hub.revision, allow_patterns=patterns)
  )
  return os.path.join(root, subfolder) if subfolder else root


def local_file(path_or_id: str | HubId, *, revision: str | None = None) -> str:
  """A local file for `path_or_id`: the path itself, or a hub download of that one file."""
  if isinstance(path_or_id, str):
    if os.path.isfile(path_or_id):
      return path_or_id
    if os.path.exists(path_or_id):
      raise CheckpointError(f"{path_or_id}: a folder, not a weight file")
    hub = parse_hub_id(path_or_id, file=True, revision=revision)
  else:
    hub = _pinned(path_or_id, revision)
  if hub.weight_name is None:
    raise CheckpointError(f"{hub}: names a folder where a file is needed (give weight_name)")
  from huggingface_hub import hf_hub_download  # pylint: disable=import-outside-toplevel

  return _download(
    hub,
    lambda: hf_hub_download(
      hub.repo_id,
      hub.weight_name,
      subfolder=hub.subfolder.strip("/") or None,
      revision=hub.revision,
    ),
  )


def file_in(
  path_or_id: str | HubId, *, subfolder: str | None = None, weight_name: str | None = None
) -> str | HubId:
  """A weight file named as diffusers names one: `path_or_id` alone (a file or a file id), or a
  local folder or hub id with `subfolder` and `weight_name` inside it."""
  if weight_name is None:
    if subfolder:
      raise CheckpointError(f"{path_or_id}: subfolder={subfolder!r} needs a weight_name")
    return path_or_id
  if not isinstance(path_or_id, str):
    raise CheckpointError(f"{path_or_id}: a HubId holds its own subfolder and weight_name")
  if os.path.isdir(path_or_id):
    return os.path.join(path_or_id, subfolder or "", weight_name)
  hub = parse_hub_id(path_or_id)
  return dataclasses.replace(
    hub,
    weight_name=weight_name,
    subfolder="/".join(p for p in (hub.subfolder, (subfolder or "").strip("/")) if p),
  )


def model_patterns(
  stem: str, variant: str | None, *, folder: str = "", config: str = "config.json"
) -> list[str]:
  """The files a model folder's loader reads, as hub allow-patterns: its config and its
  safetensors weights (`stem`, of `variant` only), whole or as shards with their index."""
  shards = (
    [
      f"{stem}.{variant}{SHARD_NUMBER}.safetensors",  # the writers' naming since 2024
      f"{stem}{SHARD_NUMBER}.{variant}.safetensors",
    ]
    if variant
    else [f"{stem}{SHARD_NUMBER}.safetensors"]
  )
  names = [config, *weight_file_names(stem, variant, torch_pickles=False), *shards]
  return [f"{folder}/{name}" if folder else name for name in names]


def read_config(folder: str, name: str = "config.json") -> dict:
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: missing")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def resolve_subfolder(path: str, subfolder: str) -> str:
  """`path` itself if it holds a config.json, else `path/subfolder` (a whole pipeline folder)."""
  if os.path.isfile(os.path.join(path, "config.json")):
    return path
  candidate = os.path.join(path, subfolder)
  if os.path.isfile(os.path.join(candidate, "config.json")):
    return candidate
  raise CheckpointError(f"{path}: neither it nor its '{subfolder}/' holds a config.json")
