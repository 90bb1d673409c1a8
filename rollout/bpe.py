"""A small byte-level BPE tokenizer trained on a task's own text, for CPU-sized policies.

The V4 chat template with one tool schema renders about 1,600 bytes before the user's text; with
the byte tokenizer that is 1,600 tokens per prompt, and the learner's forward and backward grow
faster than linearly in length. A BPE vocabulary trained on the rendered prompts and
demonstrations of the task itself compresses the fixed template into a few dozen tokens (measured
on ``arith_tool``: a 1,575-byte prompt is 122 tokens at 1,024 ids, a whole tool-using episode
about 200).

Properties of the result (an :class:`policy.tokenizer.OfficialTokenizer`):

- every byte is in the base alphabet, so any text encodes and decodes back exactly;
- digits are always single tokens (a number is never merged into a multi-digit token, so copying
  a number is copying digits);
- the V4 special tokens (``policy.dsml.SPECIAL_TOKENS``) are special ids;
- training is deterministic for the same texts and vocabulary size (a second or less), and the
  result is stored as ``tokenizer.json`` in the run directory so that a resumed run reads it
  back instead of training again.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

from policy.dsml import SPECIAL_TOKENS
from policy.tokenizer import OfficialTokenizer

__all__ = ["MIN_VOCAB", "load_or_train", "train_bpe"]

MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens


def train_bpe(texts: Iterable[str], vocab_size: int) -> str:
    """The ``tokenizer.json`` text of a byte-level BPE tokenizer of at most ``vocab_size`` ids
    trained on ``texts`` (load it with ``OfficialTokenizer(text)``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be an int >= {MIN_VOCAB}, got {vocab_size!r}")
    # Train on the text between special tokens only: a merge must never spell a special token
    # ("<think>" is plain ASCII), or plain text could turn into a special id.
    split = re.compile(
        "|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True))
    )
    pieces = [p for text in texts for p in split.split(text) if p]
    if not pieces:
        raise ValueError("train_bpe needs at least one non-empty text")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(pieces, trainer)
    text = tok.to_str()
    OfficialTokenizer(text)  # checks the special tokens
    return text


def load_or_train(path: str | Path, texts: Callable[[], Iterable[str]], vocab_size: int) -> str:
    """The ``tokenizer.json`` text stored at ``path``, or one trained on ``texts()`` and stored
    there (atomically). A stored tokenizer larger than ``vocab_size`` is an error."""
    path = Path(path)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        size = OfficialTokenizer(text).vocab_size
        if size > vocab_size:
            raise ValueError(
                f"{path} holds a tokenizer of {size} ids, more than vocab_size {vocab_size}; "
                "remove it or use the run's original config"
            )
        return text
    text = train_bpe(texts(), vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return text
