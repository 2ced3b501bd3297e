"""Our CLIP tokenizer must give exactly the ids of transformers' CLIPTokenizer.

No real CLIP vocabulary ships offline, so the tests train a small one the way CLIP's is laid out
(256 byte symbols, the same with `</w>`, then learned merges, then bos/eos) and load the same
files into both tokenizers.
"""
import collections
import json
import os

import numpy as np
import pytest

from attrib_jax.models import tokenizer as tok

transformers = pytest.importorskip("transformers")

CORPUS = """
A photo of a cat sitting on the couch. Two dogs playing in the park, isn't it nice?
A man riding a horse on the beach at sunset; the woman's umbrella is red & white.
There are 3 giraffes standing next to 12 zebras!!! They're eating leaves... We'll see.
A bowl of fruit: apples, bananas, oranges (and a pineapple). Kitchen with stainless steel.
Une photo d'un chat, très mignon. Ein Hund läuft über die Straße.
Ελληνικά γράμματα.
日本語のテキスト 東京 猫 写真 🐱🐶 emoji 😀 café naïve façade coöperate
""" * 3

PROMPTS = [
    "",
    " ",
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "  A   man\triding\na horse  ",
    "isn't it nice? they're, we'll, I'd, you've, I'm, she's, can't",
    "It'S A CAT'S TOY'LL",
    "3 giraffes and 12 zebras in 2024, 3.14159 / 1e-4 = 0x1F",
    "!!! ??? ... ,,, ;;; --- ___ *** @#$%^&*() []{} <> | \\ / ~`",
    "Une photo d'un chat, très mignon. Ein Hund läuft über die Straße.",
    "ΟΔΟΣ Σίσυφος ΣΑΣ",
    "日本語のテキスト 東京 猫",
    "🐱🐶 emoji 😀 with faces 👩‍👩‍👧",
    "cafe\u0301 nai\u0308ve (decomposed accents) x\u0301",
    "zero\u200bwidth non\u00a0breaking\u3000ideographic space",
    "İstanbul ǅemal ﬁne Ⅻ ²³ ½ ١٢٣",
    "a<|endoftext|>b <|ENDOFTEXT|> <|startoftext|>",
    "a very long prompt " * 40,
    "kitchen with stainless steel appliances and a bowl of fruit, apples, bananas",
]


def _byte_symbols():
  return list(tok.bytes_to_unicode().values())


def _train_bpe(corpus: str, num_merges: int) -> list[tuple[str, str]]:
  """Greedy BPE on the corpus' pre-tokens, in CLIP's byte/`</w>` alphabet."""
  encoder = tok.bytes_to_unicode()
  words = collections.Counter()
  for piece in tok._PRETOKENIZE.findall(tok.CLIPTokenizer.normalize(corpus)):
    chars = [encoder[b] for b in piece.encode("utf-8")]
    words[tuple(chars[:-1] + [chars[-1] + tok.END_OF_WORD])] += 1
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for word, count in words.items():
      for pair in zip(word[:-1], word[1:]):
        pairs[pair] += count
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    new_words = collections.Counter()
    for word, count in words.items():
      out, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          out.append(word[i] + word[i + 1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      new_words[tuple(out)] += count
    words = new_words
  return merges


def _write_vocab(directory, merges):
  os.makedirs(directory, exist_ok=True)
  symbols = _byte_symbols()
  vocab = {}
  for s in symbols + [s + tok.END_OF_WORD for s in symbols] + ["".join(m) for m in merges]:
    vocab.setdefault(s, len(vocab))
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return vocab


@pytest.fixture(scope="module")
def merges():
  return _train_bpe(CORPUS, 300)


def _sd1_dir(root, merges):
  """Stable Diffusion 1.x layout: pads with <|endoftext|>."""
  d = os.path.join(root, "sd1")
  _write_vocab(d, merges)
  with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
    json.dump({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True,
               "errors": "replace", "pad_token": "<|endoftext|>",
               "bos_token": {"__type": "AddedToken", "content": "<|startoftext|>",
                             "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False}}, f)
  return d


def _sd2_dir(root, merges):
  """Stable Diffusion 2.x layout: pads with `!` (id 0), from special_tokens_map.json."""
  d = os.path.join(root, "sd2")
  _write_vocab(d, merges)
  with open(os.path.join(d, "special_tokens_map.json"), "w") as f:
    json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
               "unk_token": "<|endoftext|>"}, f)
  with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
    json.dump({"model_max_length": 77, "pad_token": "!"}, f)
  return d


def _assert_same(ours, theirs, prompts, max_length=77):
  for prompt in prompts:
    expected = theirs(prompt, padding="max_length", max_length=max_length, truncation=True)
    got = ours(prompt, max_length=max_length)
    np.testing.assert_array_equal(got.input_ids[0], expected["input_ids"], err_msg=repr(prompt))
    np.testing.assert_array_equal(got.attention_mask[0], expected["attention_mask"],
                                  err_msg=repr(prompt))
    assert got.input_ids.dtype == np.int32


@pytest.mark.parametrize("layout", ["sd1", "sd2"])
def test_ids_match_transformers(tmp_path, merges, layout):
  directory = (_sd1_dir if layout == "sd1" else _sd2_dir)(str(tmp_path), merges)
  theirs = transformers.CLIPTokenizer.from_pretrained(directory)
  ours = tok.load_tokenizer(directory)
  assert ours.pad_token_id == theirs.pad_token_id
  assert ours.model_max_length == 77
  if layout == "sd2":
    assert ours.pad_token_id == 0  # `!` is the first byte symbol
  _assert_same(ours, theirs, PROMPTS + CORPUS.split("\n"))
  _assert_same(ours, theirs, PROMPTS, max_length=16)


def test_batch_padding_and_truncation(tmp_path, merges):
  ours = tok.load_tokenizer(_sd1_dir(str(tmp_path), merges))
  batch = ours(["a cat", "a photo of a cat " * 30], max_length=12)
  assert batch.input_ids.shape == (2, 12)
  assert batch.input_ids[1, -1] == ours.eos_token_id  # eos kept after truncation
  assert batch.attention_mask[0].sum() == 2 + len(ours.tokenize("a cat"))
  longest = ours(["a cat", "a dog on a mat"], padding="longest")
  assert longest.input_ids.shape[1] == 2 + len(ours.tokenize("a dog on a mat"))
  with pytest.raises(ValueError, match="truncation"):
    ours("a cat " * 40, max_length=8, truncation=False)


def test_added_token_from_tokenizer_json(tmp_path, merges):
  """Custom Diffusion adds `<new1>`; transformers 5 saves the result as tokenizer.json."""
  theirs = transformers.CLIPTokenizer.from_pretrained(_sd1_dir(str(tmp_path), merges))
  theirs.add_tokens("<new1>")
  saved = os.path.join(str(tmp_path), "saved")
  theirs.save_pretrained(saved)
  assert not os.path.exists(os.path.join(saved, "vocab.json"))
  ours = tok.load_tokenizer(saved)
  prompts = ["a photo of <new1> cat", "<NEW1> on the beach", "<new1><new1>x<new1>"] + PROMPTS
  _assert_same(ours, theirs, prompts)


def test_bad_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    tok.load_tokenizer(str(tmp_path))
  _write_vocab(str(tmp_path), [])
  with open(os.path.join(str(tmp_path), "tokenizer_config.json"), "w") as f:
    json.dump({"padding_side": "left"}, f)
  with pytest.raises(ValueError, match="padding_side"):
    tok.load_tokenizer(str(tmp_path))
