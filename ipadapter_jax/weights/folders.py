"""Model folders on disk or on the Hugging Face hub."""

from __future__ import annotations

import json
import os

from ipadapter_jax.weights.files import CheckpointError


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


def hub_patterns(variant: str | None, stem: str = "*") -> list[str]:
  """The files of a hub folder a loader may read: configs, tokenizer files, the `stem` weights
  (of `variant`, when given) as safetensors, single or sharded, and their indexes."""
  weights = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
  patterns = ["*.json", "*.txt", weights, "*.safetensors.index*.json"]
  if stem != "*":  # shards are named stem-00001-of-00002.safetensors
    patterns.append(f"{stem}*-of-*.safetensors")
  return patterns


def local_path(path_or_id: str, *, revision: str | None = None,
               allow_patterns: list[str] | None = None) -> str:
  """A local folder for `path_or_id`: the path itself, or a hub download.

  A hub id may name a folder inside its repository: "h94/IP-Adapter/models/image_encoder".
  Only files matching `allow_patterns` (relative to that folder) are fetched.
  """
  if os.path.exists(path_or_id):
    return path_or_id
  parts = path_or_id.split("/")
  if len(parts) < 2 or os.path.isabs(path_or_id) or path_or_id.startswith((".", "~")):
    raise CheckpointError(f"{path_or_id}: no such folder, and not a hub id (owner/name[/folder])")
  repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
  patterns = allow_patterns or ["*"]
  if subfolder:
    patterns = [f"{subfolder}/{p}" for p in patterns]
  from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel
  try:
    root = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
  except Exception as e:  # the hub client raises many types (offline, not found, gated)
    reason = " ".join(str(e).split())  # one line, whatever the hub client printed
    raise CheckpointError(f"{path_or_id}: not a local folder, and the hub download failed "
                          f"({type(e).__name__}: {reason})") from None
  return os.path.join(root, subfolder) if subfolder else root
