"""Prompts -> token ids through transformers' CLIPTokenizer, and small word-level vocabularies."""

from __future__ import annotations

import json
import os
import string
from typing import Sequence

import numpy as np

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def load_tokenizer(folder: str):
  """transformers' CLIPTokenizer from a `tokenizer/` folder (vocab.json + merges.txt, or the
  tokenizer.json that transformers 5 writes)."""
  from transformers import CLIPTokenizer  # pylint: disable=import-outside-toplevel

  has = lambda name: os.path.isfile(os.path.join(folder, name))
  if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
    raise FileNotFoundError(
      f"{folder}: no tokenizer files (vocab.json and merges.txt, or tokenizer.json)"
    )
  # from_pretrained, never CLIPTokenizer(vocab_file=...): transformers 5 silently ignores that
  # form and maps every word to end-of-text.
  return CLIPTokenizer.from_pretrained(folder)


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
  """Token ids [B, max_length] int32, padded and truncated as Stable Diffusion pipelines do."""
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  ids = tokenizer(
    prompts,
    padding="max_length",
    truncation=True,
    max_length=max_length or tokenizer.model_max_length,
    return_tensors="np",
  )
  return ids["input_ids"].astype(np.int32)


def write_word_tokenizer(folder: str, words: Sequence[str], model_max_length: int = 77) -> None:
  """Writes a CLIPTokenizer folder whose BPE merges spell each of `words` as one token.

  Ids: 0 start-of-text, 1 end-of-text (also padding), then every lowercase letter and digit
  with and without the end-of-word mark, then the merges' intermediate pieces. Other words
  still tokenize, letter by letter.
  """
  vocab = {BOS: 0, EOS: 1}
  add = lambda token: vocab.setdefault(token, len(vocab))
  for ch in string.ascii_lowercase + string.digits:
    add(ch)
    add(ch + "</w>")
  merges = []
  for word in sorted(set(w.lower() for w in words)):
    if not word.isalnum():
      raise ValueError(f"word {word!r}: only letters and digits make one token")
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
      merge = f"{pieces[0]} {pieces[1]}"
      if merge not in merges:
        merges.append(merge)
      pieces = [pieces[0] + pieces[1]] + pieces[2:]
      add(pieces[0])
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(
      {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
      },
      f,
    )
