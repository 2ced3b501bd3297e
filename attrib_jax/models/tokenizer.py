"""The CLIP byte-level BPE tokenizer, without transformers at run time.

Prompts become the 77 token ids the text encoder reads. The ids must equal those of the
tokenizer the diffusion model was trained with (transformers' `CLIPTokenizer`, whose pipeline is
reproduced here step by step), or every text embedding, and so every attribution score, drifts:

  1. Special and added tokens are cut out of the raw text first (e.g. `<|endoftext|>`, SD-2's pad
     token `!`, a Custom Diffusion token `<new1>`), so a prompt can name them.
  2. The rest is normalised: Unicode NFC, every whitespace run -> one space, lowercase.
  3. Pre-tokenised by CLIP's pattern: contractions, letter runs, single digits, runs of other
     non-space characters. Whitespace separates and is dropped.
  4. Each piece is UTF-8 encoded, its bytes mapped to printable characters (GPT-2's byte-to-unicode
     table, so every string is representable), `</w>` is appended to its last character, and BPE
     merges are applied lowest rank first.
  5. Truncated so that bos + tokens + eos fits `max_length`, then padded with the pad token.

Reads a model's `tokenizer/` directory: `tokenizer.json` (what transformers >= 5 writes, and
what it prefers when present) or `vocab.json` + `merges.txt` (the Stable Diffusion layout), plus
`tokenizer_config.json`, `special_tokens_map.json` and `added_tokens.json` where present.

Not reproduced: an `AddedToken` with lstrip/rstrip/single_word (an error), and transformers
honouring `normalized=True` on a *special* token (here special tokens always match the raw text,
so only a prompt spelling e.g. `<|STARTOFTEXT|>` in capitals could tokenise differently).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import unicodedata
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import regex  # \p{L} / \p{N} classes; a dependency of diffusers and transformers alike

DEFAULT_MAX_LENGTH = 77
END_OF_WORD = "</w>"
# CLIP's pre-tokenisation. The original pattern also lists the special tokens first; here they
# are cut out before normalisation instead (step 1), as transformers does, and a lowercased
# `<|STARTOFTEXT|>` that survives to this step falls apart into `<|`, `startoftext`, `|>` just as
# transformers' byte-level step splits it.
_PRETOKENIZE = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+""")
_WHITESPACE = regex.compile(r"\s+")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from the 256 byte values to printable unicode characters.

  Printable Latin-1 bytes map to themselves; the remaining (control, space, ...) bytes map, in
  order, to code points from 256 upwards. The BPE vocabulary is written in these characters, and
  CLIP's vocab.json starts with them in this dict's order (printable bytes first).
  """
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
  table = {b: chr(b) for b in keep}
  for extra, b in enumerate(b for b in range(256) if b not in table):
    table[b] = chr(256 + extra)
  return table


@dataclasses.dataclass(frozen=True)
class AddedToken:
  """A token matched whole in the text instead of being built by BPE.

  `normalized=False` tokens are matched in the raw text, `normalized=True` ones after
  normalisation (so `<NEW1>` also finds `<new1>`), as in the `tokenizers` library.
  """
  content: str
  id: int
  special: bool = False
  normalized: bool = False


class Tokenized(NamedTuple):
  input_ids: np.ndarray  # (batch, length) int32
  attention_mask: np.ndarray  # (batch, length) int32, 1 on real tokens (bos/eos included)


def _split_on(pieces: list[tuple[str, int | None]], pattern: regex.Pattern | None,
              ids: Mapping[str, int]) -> list[tuple[str, int | None]]:
  """Cuts every match of `pattern` out of the not-yet-tokenised pieces as a finished token."""
  if pattern is None:
    return pieces
  out = []
  for text, token_id in pieces:
    if token_id is not None:
      out.append((text, token_id))
      continue
    start = 0
    for match in pattern.finditer(text):
      if match.start() > start:
        out.append((text[start:match.start()], None))
      out.append((match.group(), ids[match.group()]))
      start = match.end()
    if start < len(text):
      out.append((text[start:], None))
  return out


def _alternation(tokens: Iterable[str]) -> regex.Pattern | None:
  # Longest first: alternation is leftmost-first, tokenizers matches leftmost-longest.
  tokens = sorted(set(tokens), key=lambda t: (-len(t), t))
  return regex.compile("|".join(regex.escape(t) for t in tokens)) if tokens else None


class CLIPTokenizer:
  """Text -> CLIP token ids. Build with `load_tokenizer(directory)`."""

  def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *,
               bos_token: str = "<|startoftext|>", eos_token: str = "<|endoftext|>",
               unk_token: str = "<|endoftext|>", pad_token: str = "<|endoftext|>",
               added_tokens: Sequence[AddedToken] = (),
               model_max_length: int = DEFAULT_MAX_LENGTH):
    self.vocab = dict(vocab)
    self.merge_ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
    for pair in self.merge_ranks:
      if "".join(pair) not in self.vocab:
        raise ValueError(f"merge {pair!r} produces {''.join(pair)!r}, which is not in the vocab")
    self.byte_encoder = bytes_to_unicode()
    self.model_max_length = model_max_length
    # Kept so that `add_tokens` can rebuild this tokenizer with one more token.
    self._special_tokens = dict(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token,
                                pad_token=pad_token)
    self.added_tokens = tuple(added_tokens)

    def token_id(token: str, role: str) -> int:
      if token in self.vocab:
        return self.vocab[token]
      matches = [t.id for t in added_tokens if t.content == token]
      if not matches:
        raise ValueError(f"{role} {token!r} is neither in the vocab nor an added token")
      return matches[0]

    self.bos_token_id = token_id(bos_token, "bos_token")
    self.eos_token_id = token_id(eos_token, "eos_token")
    self.unk_token_id = token_id(unk_token, "unk_token")
    self.pad_token_id = token_id(pad_token, "pad_token")
    # bos/eos/unk/pad are special tokens: matched in the raw text like any unnormalised token.
    specials = {t: i for t, i in ((bos_token, self.bos_token_id), (eos_token, self.eos_token_id),
                                  (unk_token, self.unk_token_id), (pad_token, self.pad_token_id))}
    raw = dict(specials)
    normalized = {}
    for t in added_tokens:
      if t.content in specials and specials[t.content] != t.id:
        raise ValueError(f"added token {t.content!r} has id {t.id}, the vocab "
                         f"{specials[t.content]}")
      if t.normalized and t.content not in specials:
        normalized[t.content] = t.id
      else:
        raw[t.content] = t.id
    self._raw_ids, self._normalized_ids = raw, normalized
    self._raw_pattern = _alternation(raw)
    self._normalized_pattern = _alternation(normalized)
    self._bpe_cache: dict[str, tuple[int, ...]] = {}

  def __len__(self) -> int:
    """The number of distinct ids (vocab and added tokens), as transformers' `len(tokenizer)`."""
    return len(set(self.vocab.values()) | {t.id for t in self.added_tokens})

  def add_tokens(self, contents: Sequence[str]) -> "CLIPTokenizer":
    """A new tokenizer with `contents` added as whole tokens, as transformers' `add_tokens`:
    not special, matched after normalisation, ids from max id + 1 on (Custom Diffusion's
    modifier tokens). Refuses a token that already exists or that normalisation would alter
    (it could never match its own spelling)."""
    next_id = max(max(self.vocab.values()), max((t.id for t in self.added_tokens), default=-1))
    known = set(self.vocab) | {t.content for t in self.added_tokens}
    new = []
    for content in contents:
      if not content or content in known or content in {t.content for t in new}:
        raise ValueError(f"cannot add token {content!r}: empty or already in the tokenizer")
      if self.normalize(content) != content:
        raise ValueError(f"cannot add token {content!r}: normalisation turns it into "
                         f"{self.normalize(content)!r} (use lowercase, no spaces)")
      next_id += 1
      new.append(AddedToken(content, next_id, special=False, normalized=True))
    merges = sorted(self.merge_ranks, key=self.merge_ranks.get)
    return CLIPTokenizer(self.vocab, merges, **self._special_tokens,
                         added_tokens=(*self.added_tokens, *new),
                         model_max_length=self.model_max_length)

  def _bpe(self, piece: str) -> tuple[int, ...]:
    """The ids of one pre-token: its byte characters merged by BPE, `</w>` on the last one."""
    cached = self._bpe_cache.get(piece)
    if cached is not None:
      return cached
    chars = [self.byte_encoder[b] for b in piece.encode("utf-8")]
    word = chars[:-1] + [chars[-1] + END_OF_WORD]
    while len(word) > 1:
      ranks = [self.merge_ranks.get(pair, -1) for pair in zip(word[:-1], word[1:])]
      best = min((r for r in ranks if r >= 0), default=None)
      if best is None:
        break
      merged, i = [], 0
      while i < len(word):  # merge every occurrence of the best pair, left to right
        if i < len(word) - 1 and ranks[i] == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    ids = tuple(self.vocab.get(symbol, self.unk_token_id) for symbol in word)
    if len(self._bpe_cache) < 100_000:
      self._bpe_cache[piece] = ids
    return ids

  @staticmethod
  def normalize(text: str) -> str:
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    # Character by character, as `tokenizers` does: str.lower() of a whole string would also
    # apply Greek final-sigma rules.
    return "".join(c.lower() for c in text)

  def tokenize(self, text: str) -> list[int]:
    """Ids of `text` without bos/eos, truncation or padding."""
    pieces = _split_on([(text, None)], self._raw_pattern, self._raw_ids)
    pieces = [(self.normalize(t), None) if i is None else (t, i) for t, i in pieces]
    pieces = _split_on(pieces, self._normalized_pattern, self._normalized_ids)
    ids = []
    for text_piece, token_id in pieces:
      if token_id is not None:
        ids.append(token_id)
      else:
        for word in _PRETOKENIZE.findall(text_piece):
          ids.extend(self._bpe(word))
    return ids

  def check_fits(self, text: str, max_length: int | None = None) -> None:
    """Raises ValueError naming `text` if it would be truncated. Training captions are cut as
    in every diffusion recipe; a user's prompt is not, or its query would be attributed with
    the text states of a shorter prompt than the one it records."""
    max_length = self.model_max_length if max_length is None else max_length
    length = len(self.tokenize(text)) + 2
    if length > max_length:
      raise ValueError(f"the prompt {text!r} is {length} tokens long (with bos and eos), but "
                       f"the tokenizer takes at most {max_length} (its model_max_length): "
                       "shorten the prompt")

  def encode(self, text: str, max_length: int | None = None, truncation: bool = True) -> list[int]:
    """bos + ids + eos, truncated (keeping bos and eos) to `max_length` if `truncation`."""
    ids = self.tokenize(text)
    max_length = self.model_max_length if max_length is None else max_length
    if truncation:
      if max_length < 2:
        raise ValueError(f"max_length={max_length} leaves no room for bos and eos")
      ids = ids[:max_length - 2]
    return [self.bos_token_id, *ids, self.eos_token_id]

  def __call__(self, texts: str | Sequence[str], max_length: int | None = None, *,
               padding: str = "max_length", truncation: bool = True) -> Tokenized:
    """Tokenises a prompt or a batch of prompts into (batch, length) int32 arrays.

    Args:
      texts: one string or a sequence of strings.
      max_length: total length including bos/eos; default `model_max_length` (77 for SD).
      padding: "max_length" pads to `max_length` (what diffusion pipelines do); "longest" pads
        to the longest sequence of the batch.
      truncation: cut sequences longer than `max_length` (keeping eos last). Without it a
        sequence longer than `max_length` is an error under "max_length" padding.
    """
    if isinstance(texts, str):
      texts = [texts]
    max_length = self.model_max_length if max_length is None else max_length
    sequences = [self.encode(t, max_length, truncation) for t in texts]
    if padding == "max_length":
      length = max_length
      too_long = [len(s) for s in sequences if len(s) > length]
      if too_long:
        raise ValueError(f"a prompt has {max(too_long)} tokens > max_length={length}; "
                         "pass truncation=True")
    elif padding == "longest":
      length = max(len(s) for s in sequences)
    else:
      raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
    input_ids = np.full((len(sequences), length), self.pad_token_id, np.int32)
    attention_mask = np.zeros((len(sequences), length), np.int32)
    for row, sequence in enumerate(sequences):
      input_ids[row, :len(sequence)] = sequence
      attention_mask[row, :len(sequence)] = 1
    return Tokenized(input_ids, attention_mask)


def _token_content(value: Any) -> str | None:
  """A token from a config: either a string or a serialised AddedToken dict."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and "content" in value:
    return value["content"]
  raise ValueError(f"cannot read a token from {value!r}")


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _check_added_token_flags(entry: Mapping[str, Any]) -> None:
  for flag in ("lstrip", "rstrip", "single_word"):
    if entry.get(flag):
      raise ValueError(f"added token {entry.get('content')!r} sets {flag}=True, which this "
                       "tokenizer does not implement")


def load_tokenizer(directory: str | os.PathLike) -> CLIPTokenizer:
  """Reads a CLIP tokenizer directory (see the module docstring for the files)."""
  directory = os.fspath(directory)
  path = lambda name: os.path.join(directory, name)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No such tokenizer directory: {directory}")
  config = _read_json(path("tokenizer_config.json")) if os.path.exists(
      path("tokenizer_config.json")) else {}
  specials = _read_json(path("special_tokens_map.json")) if os.path.exists(
      path("special_tokens_map.json")) else {}

  tokenizer_class = config.get("tokenizer_class", "CLIPTokenizer")
  if tokenizer_class not in ("CLIPTokenizer", "CLIPTokenizerFast"):
    raise ValueError(f"{directory}: tokenizer_class {tokenizer_class!r} is not a CLIP tokenizer")
  for side in ("padding_side", "truncation_side"):
    if config.get(side, "right") != "right":
      raise ValueError(f"{directory}: {side}={config[side]!r} is not supported (only 'right')")

  added: dict[str, AddedToken] = {}
  if os.path.exists(path("tokenizer.json")):  # what transformers itself prefers
    spec = _read_json(path("tokenizer.json"))
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
      raise ValueError(f"{directory}/tokenizer.json is not a CLIP BPE model")
    vocab = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    for entry in spec.get("added_tokens", []):
      _check_added_token_flags(entry)
      added[entry["content"]] = AddedToken(entry["content"], entry["id"],
                                           entry.get("special", False),
                                           entry.get("normalized", False))
  elif os.path.exists(path("vocab.json")) and os.path.exists(path("merges.txt")):
    vocab = _read_json(path("vocab.json"))
    with open(path("merges.txt"), encoding="utf-8") as f:
      lines = f.read().split("\n")
    merges = [tuple(line.split(" ")) for line in lines
              if line and not line.startswith("#version")]
  else:
    raise FileNotFoundError(f"{directory}: needs vocab.json + merges.txt, or tokenizer.json")
  bad = [m for m in merges if len(m) != 2]
  if bad:
    raise ValueError(f"{directory}: malformed merge lines {bad[:3]}")

  if os.path.exists(path("added_tokens.json")):
    for content, token_id in _read_json(path("added_tokens.json")).items():
      added.setdefault(content, AddedToken(content, token_id, False, True))
  for token_id, entry in config.get("added_tokens_decoder", {}).items():
    _check_added_token_flags(entry)
    added[entry["content"]] = AddedToken(entry["content"], int(token_id),
                                         entry.get("special", False),
                                         entry.get("normalized", False))
  # Special tokens are always matched in the raw text (see CLIPTokenizer.__init__).
  for token in config.get("additional_special_tokens", []) + specials.get(
      "additional_special_tokens", []):
    content = _token_content(token)
    token_id = vocab.get(content, added[content].id if content in added else None)
    if token_id is None:
      raise ValueError(f"{directory}: additional special token {content!r} has no id")
    added[content] = AddedToken(content, token_id, True, False)

  def role(name: str, default: str) -> str:
    value = config.get(name, specials.get(name))
    return _token_content(value) or default

  max_length = config.get("model_max_length", DEFAULT_MAX_LENGTH)
  if not isinstance(max_length, int) or max_length > 1_000_000:  # "unbounded" sentinel
    max_length = DEFAULT_MAX_LENGTH
  return CLIPTokenizer(
      vocab, merges,
      bos_token=role("bos_token", "<|startoftext|>"),
      eos_token=role("eos_token", "<|endoftext|>"),
      unk_token=role("unk_token", "<|endoftext|>"),
      pad_token=role("pad_token", "<|endoftext|>"),
      added_tokens=list(added.values()),
      model_max_length=max_length)
