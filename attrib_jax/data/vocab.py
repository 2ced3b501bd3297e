"""Tokenizer files for a world that has no pretrained tokenizer: BPE learned from its captions.

The output is the CLIP tokenizer format (`vocab.json` + `merges.txt`, byte-level symbols with
`</w>` ending a word, `<|startoftext|>` / `<|endoftext|>`), so the tiny world's model directory
is read by the same `attrib_jax.models.tokenizer.load_tokenizer` (and by transformers) as a
Stable Diffusion one. Merges are learned the textbook way: repeatedly merge the most frequent
adjacent pair of symbols over the caption words, ties broken by the pair itself, so the files
are a deterministic function of the captions.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Iterable

from attrib_jax import io_utils
from attrib_jax.models import tokenizer as tokenizer_lib

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _words(captions: Iterable[str]) -> collections.Counter:
  counts = collections.Counter()
  byte_chars = tokenizer_lib.bytes_to_unicode()
  for caption in captions:
    for word in tokenizer_lib._PRETOKENIZE.findall(  # pylint: disable=protected-access
        tokenizer_lib.CLIPTokenizer.normalize(caption)):
      symbols = [byte_chars[b] for b in word.encode("utf-8")]
      symbols[-1] += tokenizer_lib.END_OF_WORD
      counts[tuple(symbols)] += 1
  return counts


def learn_bpe(captions: Iterable[str], max_merges: int = 10_000) -> list[tuple[str, str]]:
  """Merges until every caption word is one symbol (or `max_merges`)."""
  words = _words(captions)
  merges = []
  while len(merges) < max_merges:
    pairs = collections.Counter()
    for word, count in words.items():
      for pair in zip(word, word[1:]):
        pairs[pair] += count
    if not pairs:
      break
    best = max(pairs, key=lambda pair: (pairs[pair], pair))
    merges.append(best)
    merged = collections.Counter()
    for word, count in words.items():
      out, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == best:
          out.append(word[i] + word[i + 1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      merged[tuple(out)] += count
    words = merged
  return merges


def write_tokenizer_files(directory: str, captions: Iterable[str], max_length: int) -> None:
  """Writes vocab.json, merges.txt and tokenizer_config.json for `load_tokenizer`."""
  merges = learn_bpe(captions)
  byte_symbols = list(tokenizer_lib.bytes_to_unicode().values())
  tokens = byte_symbols + [s + tokenizer_lib.END_OF_WORD for s in byte_symbols]
  tokens += ["".join(m) for m in merges] + [BOS, EOS]
  vocab = {}
  for token in tokens:
    vocab.setdefault(token, len(vocab))
  os.makedirs(directory, exist_ok=True)
  io_utils.atomic_write_json(os.path.join(directory, "vocab.json"), vocab, indent=None,
                             sort_keys=False, ensure_ascii=False)
  io_utils.atomic_write_text(os.path.join(directory, "merges.txt"),
                             "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  io_utils.atomic_write_json(os.path.join(directory, "tokenizer_config.json"),
                             {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
                              "bos_token": BOS, "eos_token": EOS, "unk_token": EOS,
                              "pad_token": EOS, "do_lower_case": True}, sort_keys=False)
