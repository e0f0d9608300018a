"""Drafting with a draft model whose tokenizer differs from the target's, through text.

:class:`TextCodec` decodes the context incrementally and re-encodes it for the draft model (a
frozen head and an open tail); :class:`TextBridgeDrafter` drafts greedily and encodes the draft's
text for the target (drafts without probabilities, so sampling verifies them as deterministic
proposals). :func:`check_bridgeable` refuses tokenizers that do not reproduce a probe text
through encode/decode.
"""

from __future__ import annotations

import torch

from ...errors import ConfigError
from ...types import Draft
from ..base import Context, StepFeedback
from .draft_runner import (
    DEFAULT_CONFIDENCE,
    GREEDY_PARAMS,
    DraftRunner,
    check_confidence,
)

# --------------------------------------------------------------------------- different tokenizers
_ANCHOR = "\n"  # encoded before a piece of text so that the piece starts as it would mid-text


PROBE_TEXT = (
    "Hello, world! The quick brown fox jumps over 13 lazy dogs.\n"
    'Second line: (a + b) * c = d; x_1 <= y\'s "value"?'
)


_PROBE_CUTS = (3, 5, 6, 13, 40, 59, 60, 75)  # mid-word, at a space, after a newline, ...


class TextCodec:
    """Text <-> token ids for one tokenizer, with pieces that continue a text."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.anchor_ids = self.encode(_ANCHOR)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` at the start of a sequence, no special tokens."""
        return list(self.tok.encode(text, add_special_tokens=False)) if text else []

    def encode_piece(self, text: str) -> list[int]:
        """Token ids of ``text`` as a continuation of some earlier text: encoded after an anchor
        (a newline) whose tokens are then dropped, so that tokenizers that treat the start of a
        text specially (a SentencePiece dummy prefix space) do not; plain :meth:`encode` where
        the anchor merges with the text."""
        if not text:
            return []
        ids = self.encode(_ANCHOR + text)
        a = self.anchor_ids
        if a and ids[: len(a)] == a and len(ids) > len(a):
            return ids[len(a) :]
        return self.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def continuation(self, before: list[int], new: list[int]) -> str:
        """The text ``new`` adds after ``before`` (a few tokens of context: decoders that strip a
        leading space or join bytes need it)."""
        head = self.decode(before)
        full = self.decode(before + new)
        return full[len(head) :] if full.startswith(head) else self.decode(new)

    def start_ids(self) -> list[int]:
        """The special tokens the tokenizer puts before a text (BOS), if any."""
        plain = self.encode("a")
        full = list(self.tok.encode("a", add_special_tokens=True))
        n = len(full) - len(plain)
        return full[:n] if n > 0 and full[n:] == plain else []


def check_bridgeable(target_tokenizer, draft_tokenizer) -> None:
    """Raise ConfigError unless both tokenizers reproduce :data:`PROBE_TEXT` through encode and
    decode, whole and cut in two pieces (the first encoded as a start, the rest as a piece)."""
    for who, tok in (("target", target_tokenizer), ("draft", draft_tokenizer)):
        if tok is None:
            raise ConfigError(
                f"method sps: the draft model's vocabulary differs from the target's and the "
                f"{who} model's tokenizer is missing, so drafts cannot be bridged through text: "
                "load both models with their tokenizers (a model directory or .gguf file)"
            )
        codec = TextCodec(tok)
        texts = [(PROBE_TEXT, codec.decode(codec.encode(PROBE_TEXT)))]
        for cut in _PROBE_CUTS:
            a, b = PROBE_TEXT[:cut], PROBE_TEXT[cut:]
            texts.append((PROBE_TEXT, codec.decode(codec.encode(a) + codec.encode_piece(b))))
        for want, got in texts:
            if got != want:
                raise ConfigError(
                    f"method sps: the draft model's tokenizer differs from the target's and the "
                    f"{who} tokenizer does not reproduce text through encode/decode "
                    f"({want[:40]!r}... came back as {got[:40]!r}...), so the vocabularies cannot "
                    "be bridged: use a draft model with the target's tokenizer, or one whose "
                    "tokenizer round-trips text (byte-level BPE, SentencePiece with byte fallback)"
                )


class TextBridgeDrafter:
    """Drafts with a model whose tokenizer differs from the target's, through text.

    Per step: the target context is decoded (incrementally: only the new tokens, checked against
    a few tokens before them); the text is re-tokenized for the draft model, keeping the ids of a
    *frozen* head (cut at a space or newline once the rest grows past ``freeze_chars``) and
    re-encoding only the open tail; the draft model's cache follows those ids (common prefix kept,
    the rest fed). The draft model then drafts ``budget + 1`` tokens greedily; their text is
    encoded with the target's tokenizer as a continuation of the context, and the last target
    token is dropped (unless the draft model ended its text), since the text may stop inside a
    word the target would tokenize differently.
    """

    name = "draft-model-text"
    TAIL = 4  # tokens of context decoded with new tokens (for decoders that join or strip)

    def __init__(
        self,
        model,
        target_tokenizer,
        draft_tokenizer,
        target_vocab: int,
        confidence: float = DEFAULT_CONFIDENCE,
        freeze_chars: int = 1024,
    ) -> None:
        check_confidence(confidence)
        check_bridgeable(target_tokenizer, draft_tokenizer)
        self.runner = DraftRunner(model)
        self.target, self.draft = TextCodec(target_tokenizer), TextCodec(draft_tokenizer)
        self.target_vocab = int(target_vocab)
        self.confidence = confidence
        self.freeze_chars = freeze_chars
        self.start = self.draft.start_ids()
        special = getattr(draft_tokenizer, "all_special_ids", [])
        self.draft_special = frozenset(int(i) for i in special)
        self.draft_vocab = min(int(model.vocab_size), len(draft_tokenizer))  # ids it can decode
        self.reset()

    @property
    def model(self):
        return self.runner.model

    def reset(self) -> None:
        self.runner.reset()
        self._t_ids: list[int] = []  # target ids whose text is self._text
        self._text = ""
        self._frozen_text = ""  # a prefix of self._text ...
        self._frozen_ids: list[int] = []  # ... and its draft ids

    # ------------------------------------------------------------------ text of the context
    def context_text(self, ids: list[int]) -> str:
        """The target context decoded, reusing the text of the previous call's context."""
        n = len(self._t_ids)
        text = None
        if 0 < n <= len(ids) and ids[:n] == self._t_ids:
            w = max(0, n - self.TAIL)
            head = self.target.decode(ids[w:n])
            full = self.target.decode(ids[w:])
            if full.startswith(head) and self._text.endswith(head):
                text = self._text + full[len(head) :]
        if text is None:
            text = self.target.decode(ids)
        self._t_ids, self._text = list(ids), text
        return text

    def draft_ids(self, text: str) -> list[int]:
        """Draft-model ids for ``text``: start tokens + frozen head + the open tail re-encoded."""
        if not text.startswith(self._frozen_text):
            self._frozen_text, self._frozen_ids = "", []
        fc = len(self._frozen_text)
        enc = self.draft.encode_piece if fc else self.draft.encode
        tail = text[fc:]
        if len(tail) > self.freeze_chars:
            lim = len(tail) - self.freeze_chars // 4
            cut = max(tail.rfind(" ", 0, lim), tail.rfind("\n", 0, lim))
            if cut > 0:
                self._frozen_ids = self._frozen_ids + enc(tail[:cut])
                self._frozen_text = text[: fc + cut]
                tail, enc = tail[cut:], self.draft.encode_piece
        return self.start + self._frozen_ids + enc(tail)

    # ------------------------------------------------------------------ drafter
    def propose(self, ctx: Context, budget: int) -> Draft:
        text = self.context_text(ctx.tokens.tolist())
        d_ids = self.draft_ids(text)
        k = self.runner.max_draft(len(d_ids), budget + 1)
        if not d_ids or k < 1:
            return Draft.empty()
        logits = self.runner.sync(torch.tensor(d_ids, dtype=torch.long), extra=k - 1)
        toks, _ = self.runner.draft(
            logits, k, GREEDY_PARAMS, None, self.confidence, self.draft_vocab
        )
        new = toks.tolist()
        ended = False
        for i, t in enumerate(new):
            if t in self.draft_special:  # EOS (or another special token): the text ends there
                new, ended = new[:i], True
                break
        piece = self.draft.continuation(d_ids[-self.TAIL :], new).rstrip("\ufffd")
        out = self.target.encode_piece(piece)
        if not ended and len(out) > 1:
            out = out[:-1]  # the text may stop inside a word: its last token is a guess
        out = [t for t in out[:budget] if t < self.target_vocab]
        return Draft.chain(out) if out else Draft.empty()

    def observe(self, ctx: Context, feedback: StepFeedback) -> None:
        """Nothing to learn."""
