"""An independent draft model (method ``sps``): a smaller model drafts, the target verifies.

The draft model is any model the runtime loads (native, or through the transformers adapter) and
keeps a KV cache of its own. Which drafter serves it is decided once, from the tokenizers
(:func:`make_draft_model_drafter`):

* **Same tokenizer** (:class:`DraftModelDrafter`, speculative sampling as in Leviathan et al.
  2023 and Chen et al. 2023): the draft model reads the target's token ids and drafts a chain of
  ``budget`` tokens autoregressively. Greedy: the argmax. Sampling: each token is drawn from
  ``q``, the draft model's distribution processed with the *same* temperature / top-k / top-p as
  the target's (:func:`genrefine.sampling.logits_to_probs`), and the draft carries ``q``
  (``Draft.probs``), so speculative sampling accepts a token with ``min(1, p / q)`` and the output
  has exactly the target's distribution. The two models may have different vocabulary *sizes*
  with the same tokenizer (embedding matrices padded past the tokenizer, as Qwen's are): drafts
  and ``q`` cover only the ids both models have, ``q`` is zero past them.
* **Different tokenizers** (:class:`TextBridgeDrafter`): the target's context is decoded to text
  and re-tokenized for the draft model; the draft model's greedy continuation is decoded and the
  new text encoded with the target's tokenizer. Those drafts are deterministic (``probs=None``):
  greedy verification gives exactly the target's greedy output, and speculative sampling treats
  each token as a point mass, which keeps the target's distribution too. The bridge needs both
  tokenizers to reproduce text through encode and decode, also when a text is encoded in two
  pieces (:func:`check_bridgeable`); otherwise it is refused with a one-line
  :class:`~genrefine.errors.ConfigError`.

Cache sync (both drafters, :class:`DraftRunner`): the drafter remembers which token ids its
cache holds; each ``propose`` keeps the longest common prefix with the new context, rolls the rest
back (O(1)) and feeds only what is new: after a fully accepted draft its last token and the bonus,
after a rejection just the bonus. No ``observe`` is needed, so the drafter also stays right when
another drafter served some steps.

Reduced head (same tokenizer, native draft models): the draft model may project onto a subset
of the vocabulary (``vocab_ids``; :func:`genrefine.methods._draft_vocab` gives the 32768 most
frequent tokens by default for vocabularies over 65536, as for self-drafting). A small model's
head is then a small part of a draft token's cost instead of most of it. Greedy drafts are the
argmax over the subset; sampled drafts are drawn from ``q`` over the subset, zero elsewhere, and
speculative sampling stays exact for any ``q`` it is told. Verification uses the whole vocabulary.

Early stop: drafting stops after the first token whose top draft probability (the softmax of the
draft logits; under sampling the top of ``q``) is below ``confidence``; that token is still
proposed, as in transformers' ``assistant_confidence_threshold`` (whose default, 0.4, is ours).
Deciding a chain's length from the tokens drawn so far keeps speculative sampling exact: whether
node ``i`` has a child is fixed before that child is drawn. Once the context no longer fits in
the draft model's own context length, nothing is drafted (plain decoding steps).

One drafter holds one cache: sequences decoded concurrently with the same drafter stay correct
(each ``propose`` syncs to its context) but refill the cache whenever they alternate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from ..sampling import logits_to_probs, sample
from ..types import Draft, SamplingParams
from .base import Context, StepFeedback

DEFAULT_CONFIDENCE = 0.4
PREFILL_CHUNK = 512  # context tokens fed to the draft model per forward
_GREEDY = SamplingParams()


# --------------------------------------------------------------------------- the draft model
def _common_prefix_len(a: Tensor, b: Tensor) -> int:
    """Length of the longest common prefix of two [n] long tensors (on the CPU)."""
    n = min(int(a.shape[0]), int(b.shape[0]))
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0, 0]) if diff.numel() else n


class DraftRunner:
    """The draft model with its own KV cache, kept in step with a sequence of its token ids.

    The cache is allocated on first use and grown (refilled from scratch) when a context no
    longer fits; ``ids[:cache.length]`` are the tokens it holds.
    """

    def __init__(self, model, head=None) -> None:
        self.model = model
        self.head = head  # a ReducedHead: logits over head.ids only (column j is token head.ids[j])
        self.cache = None
        self.ids = torch.zeros(0, dtype=torch.long)  # [capacity] long, CPU

    def reset(self) -> None:
        if self.cache is not None:
            self.cache.reset()

    def max_draft(self, context_len: int, budget: int) -> int:
        """How many of ``budget`` tokens fit after a context of ``context_len`` tokens (drafting
        ``k`` tokens feeds ``context_len + k - 1``)."""
        return max(0, min(budget, self.model.max_context - context_len + 1))

    def _reserve(self, need: int) -> None:
        if self.cache is not None and need <= self.cache.capacity:
            return
        cap = min(self.model.max_context, max(2 * need, 256))
        self.cache = self.model.new_cache(cap)
        self.ids = torch.zeros(cap, dtype=torch.long)

    def sync(self, ids: Tensor, extra: int) -> Tensor:
        """Make the cache hold ``ids`` ([L] long, L >= 1) with room for ``extra`` more; returns
        the logits after ``ids[-1]`` ([1, V_draft] float32). Feeds only what the cache lacks."""
        ids = ids.cpu()
        L = int(ids.shape[0])
        assert L >= 1, "the draft model needs at least one context token"
        self._reserve(L + extra)
        cache = self.cache
        keep = min(_common_prefix_len(self.ids[: cache.length], ids), L - 1)
        cache.rollback(cache.length - keep)  # the last token is always fed: its logits are needed
        logits = None
        for s in range(keep, L, PREFILL_CHUNK):
            chunk = ids[s : s + PREFILL_CHUNK]
            last = s + PREFILL_CHUNK >= L
            rows = torch.tensor([chunk.shape[0] - 1]) if last else torch.zeros(0, dtype=torch.long)
            logits = self._forward(chunk, cache, rows)
        self.ids[keep:L] = ids[keep:]
        return logits

    def _forward(self, tokens: Tensor, cache, rows: Tensor | None = None) -> Tensor | None:
        """The draft model's logits for ``tokens``' rows ``rows`` (None: all), over the reduced
        head's columns when there is one."""
        tokens = tokens.to(self.model.device)
        if self.head is None:
            return self.model.forward(tokens, cache, logits_rows=rows).logits
        return self.model.forward(tokens, cache, logits_rows=rows, vocab_subset=self.head).logits

    def token_ids(self, cols: Tensor) -> Tensor:
        """Token ids of logit columns ``cols`` (the same without a reduced head)."""
        return cols if self.head is None else self.head.ids[cols.to(self.head.ids.device)]

    def expand(self, q: Tensor, vocab: int) -> Tensor:
        """``q`` [n, columns] as a distribution over token ids ``0 .. vocab - 1`` ([n, vocab],
        zero for ids the draft cannot propose)."""
        if self.head is None:
            return q if q.shape[1] == vocab else torch.nn.functional.pad(q, (0, vocab - q.shape[1]))
        full = q.new_zeros(q.shape[0], vocab)
        return full.index_copy_(1, self.head.ids.to(q.device), q)

    def draft(
        self,
        logits: Tensor,
        k: int,
        params: SamplingParams,
        generator: torch.Generator | None,
        confidence: float,
        vocab: int,
        stop=None,
    ) -> tuple[Tensor, Tensor | None]:
        """A chain of at most ``k`` tokens after :meth:`sync` returned ``logits`` ([1, V]).

        Only the first ``vocab`` columns are drafted (ids below ``vocab``, or with a reduced head
        its columns, all of them). Greedy ``params``: the argmax, returns ``(tokens [n], None)``.
        Sampling: each token drawn from ``q`` = :func:`logits_to_probs` of the draft logits with
        ``params``, returns ``(tokens [n], q [n, vocab])`` over the columns (:meth:`expand` maps
        it onto token ids). Tokens are token ids on the CPU; the cache ends up holding the context
        and the first ``n - 1`` draft tokens. ``stop``, a :class:`~genrefine.policy.DraftStop`,
        replaces the ``confidence`` threshold: it is told each token's top draft probability and
        says whether to draft another.
        """
        assert logits.shape[0] == 1 and k >= 1, (tuple(logits.shape), k)
        if stop is not None:
            stop.begin()
        want_top = stop is not None or confidence > 0.0  # top draft probabilities are read
        cache = self.cache
        start = cache.length
        toks: list[Tensor] = []
        qs: list[Tensor] = []
        for i in range(k):
            row = logits[:, :vocab]  # [1, vocab]
            if params.greedy:
                if want_top:
                    top, tok = row.softmax(dim=-1).max(dim=-1)  # [1], [1]
                else:
                    top, tok = None, row.argmax(dim=-1)
            else:
                q = logits_to_probs(row, params)  # [1, vocab]
                qs.append(q)
                dev = generator.device if generator is not None else q.device
                tok = sample(q.to(dev), generator).to(q.device)  # [1]
                top = q.max(dim=-1).values if want_top else None
            tok = self.token_ids(tok)
            toks.append(tok)
            if stop is not None:  # told every token, the last one too (it may be cut)
                if not stop.add(float(top)) or i + 1 == k:
                    break
            elif i + 1 == k or (top is not None and float(top) < confidence):  # one host sync
                break
            logits = self._forward(tok, cache)  # [1, V]
        out = torch.cat(toks).cpu()  # [n]
        self.ids[start : start + out.shape[0] - 1] = out[:-1]
        return out, (torch.cat(qs) if qs else None)


def _check_confidence(confidence: float) -> None:
    if not 0.0 <= confidence <= 1.0:
        raise ConfigError(f"the draft confidence threshold must be in [0, 1], got {confidence}")


# --------------------------------------------------------------------------- same tokenizer
class DraftModelDrafter:
    """Drafts with a model that shares the target's tokenizer (token ids mean the same)."""

    name = "draft-model"

    def __init__(
        self,
        model,
        target_vocab: int,
        confidence: float = DEFAULT_CONFIDENCE,
        vocab_ids: Tensor | None = None,
        stop=None,
    ) -> None:
        """``vocab_ids``: draft onto these token ids only ([v] long, FR-Spec's reduced head, see
        :mod:`genrefine.vocab`), for draft models that can project onto a subset
        (``reduced_head``, the native runtime); ignored for others. ``stop``: a
        :class:`~genrefine.policy.DraftStop` deciding the draft length (adaptive) instead of
        the ``confidence`` threshold; :meth:`with_adaptive_stop` makes one."""
        _check_confidence(confidence)
        self.target_vocab = int(target_vocab)
        both = min(self.target_vocab, int(model.vocab_size))  # ids both models have
        head = None
        if vocab_ids is not None and hasattr(model, "reduced_head"):
            ids = torch.unique(vocab_ids.long().cpu())
            ids = ids[ids < both]
            if ids.numel() == 0:
                raise ConfigError("the draft vocabulary has no token id that both models have")
            if ids.numel() < both:
                head = model.reduced_head(ids)
        self.runner = DraftRunner(model, head)
        self.vocab = both if head is None else int(head.ids.shape[0])  # columns drafted
        self.confidence = confidence
        self.stop = stop

    def draft_cost_key(self) -> str:
        """What the draft model's per-token time depends on (for a cached measurement)."""
        from ..diskcache import machine_key

        m, head = self.model, self.runner.head
        cols = "all" if head is None else str(int(head.ids.shape[0]))
        return (f"draft:{getattr(m, 'name', type(m).__name__)}|head={cols}|{getattr(m, 'dtype', '')}"
                f"|{machine_key(getattr(m, 'device', 'cpu'))}")

    def with_adaptive_stop(self, verify_cost) -> "DraftModelDrafter":
        """Decide draft lengths with a :class:`~genrefine.policy.DraftStop`: ``verify_cost``
        (the target's forward times) and the draft model's time per draft token, measured once
        per model, head and machine and cached on disk (see :func:`genrefine.policy.load_or_measure`)."""
        from ..policy import DraftStop, load_or_measure

        kw = {} if self.runner.head is None else {"forward_kwargs": {"vocab_subset": self.runner.head}}
        table = load_or_measure(self.model, self.draft_cost_key(), sizes=(1,), **kw)
        self.stop = DraftStop(verify_cost, table(1))
        return self

    @property
    def model(self):
        return self.runner.model

    def reset(self) -> None:
        self.runner.reset()
        if self.stop is not None:
            self.stop.reset()

    def propose(self, ctx: Context, budget: int) -> Draft:
        ids = ctx.tokens
        k = self.runner.max_draft(int(ids.shape[0]), budget)
        if k < 1:
            return Draft.empty()
        params = ctx.params or _GREEDY
        if not params.greedy:
            assert ctx.generator is not None, "sampled drafts need the generation's generator"
        logits = self.runner.sync(ids, extra=k - 1)
        toks, q = self.runner.draft(
            logits, k, params, ctx.generator, self.confidence, self.vocab, self.stop
        )
        if self.stop is not None:  # greedy: verify only the prefix that pays (the rest is in
            n = self.stop.keep(cut=params.greedy)  # the cache; the next sync rolls it back)
            toks, q = toks[:n], (None if q is None else q[:n])
        if q is not None:
            q = self.runner.expand(q, self.target_vocab)  # [n, target_vocab]
        return Draft.chain(toks, q)

    def observe(self, ctx: Context, feedback: StepFeedback) -> None:
        """The adaptive stop learns how sure the draft is; the cache needs nothing: the next
        ``propose`` finds what was accepted in its context."""
        if self.stop is not None:
            self.stop.observe(feedback.result.num_accepted)


# --------------------------------------------------------------------------- different tokenizers
_ANCHOR = "\n"  # encoded before a piece of text so that the piece starts as it would mid-text
PROBE_TEXT = (
    "Hello, world! The quick brown fox jumps over 13 lazy dogs.\n"
    "Second line: (a + b) * c = d; x_1 <= y's \"value\"?"
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
        _check_confidence(confidence)
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
        toks, _ = self.runner.draft(logits, k, _GREEDY, None, self.confidence, self.draft_vocab)
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


# --------------------------------------------------------------------------- choosing
def same_tokenizer(target_model, draft_model, target_tokenizer, draft_tokenizer) -> bool:
    """Whether token ids mean the same in both models.

    With both tokenizers: their vocabularies (token -> id) are equal. Without one of them: the
    models' vocabulary sizes are equal (a missing tokenizer is taken to be the other's).
    """
    if target_tokenizer is not None and draft_tokenizer is not None:
        if target_tokenizer is draft_tokenizer:
            return True
        return target_tokenizer.get_vocab() == draft_tokenizer.get_vocab()
    return int(target_model.vocab_size) == int(draft_model.vocab_size)


def make_draft_model_drafter(
    target_model,
    draft_model,
    target_tokenizer=None,
    draft_tokenizer=None,
    confidence: float = DEFAULT_CONFIDENCE,
    vocab_ids: Tensor | None = None,
):
    """The drafter for ``draft_model``: token-level when it shares the target's tokenizer, else
    the text bridge (ConfigError when the two cannot be bridged). ``vocab_ids``: a reduced draft
    vocabulary for the token-level drafter (see :class:`DraftModelDrafter`)."""
    for name in ("forward", "new_cache", "vocab_size", "max_context"):
        if not hasattr(draft_model, name):
            raise ConfigError(
                f"the draft model must be a model path or a loaded genrefine model "
                f"(genrefine.models.loading.load_model), got {type(draft_model).__name__}"
            )
    if same_tokenizer(target_model, draft_model, target_tokenizer, draft_tokenizer):
        return DraftModelDrafter(draft_model, target_model.vocab_size, confidence, vocab_ids)
    if target_tokenizer is None or draft_tokenizer is None:
        check_bridgeable(target_tokenizer, draft_tokenizer)  # raises: a tokenizer is missing
    return TextBridgeDrafter(
        draft_model, target_tokenizer, draft_tokenizer, target_model.vocab_size, confidence
    )
