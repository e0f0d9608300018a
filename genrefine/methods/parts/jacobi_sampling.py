"""Speculative Jacobi decoding (SJD, Teng et al. 2025) and its coupled variant (MC-SJD): a
training-free drafter whose draft is the previous iteration's guesses, drawn from the target's own
distributions of the last verification forward.

Terms are those of :mod:`genrefine.types`. State per sequence: a *window* of up to ``window``
pending positions right after the root, each with the distribution ``q`` its token is drawn from.

* ``propose``: the first ``budget`` window positions, as a chain; under sampling each token is
  drawn from its ``q`` (``Draft.probs`` = those rows) with the generation's generator. Before
  any verification (the first step, or after other drafters moved the context) every ``q`` is
  uniform over the vocabulary.
* ``observe``: the forward verified ``[root] + draft`` (n nodes) and accepted ``a`` of them plus a
  bonus. Its rows after the accepted path, ``a + 1 .. n``, were computed on the old prefix (whose
  node ``a`` was rejected) and predict, position by position, exactly the positions that now follow
  the new root: they are the next Jacobi iterate. Row ``a + 1 + j`` processed with the
  generation's ``SamplingParams`` (``logits_to_probs``) becomes ``q`` of window position ``j``;
  the window is filled up to ``window`` with the last row's distribution. After a full acceptance
  (``a == n``) the window starts from the last row's distribution.

Why it is lossless: speculative sampling (:mod:`genrefine.verify.sampling`) emits the target's
distribution for *any* ``q``, as long as the drafted token really is a draw from the ``q`` it
reports, given everything the verifier and the earlier positions depend on. A row of the last
forward depends only on tokens before its position, and each token is drawn from its row
afresh, so this holds whatever the rows were computed on. (Tokens are drawn when proposed rather
than when observed: the same draws in another order, and none wasted on positions that are never
drafted.)

Greedy (temperature 0): tokens are the rows' argmaxes instead (the initial guesses copies of the
root), which is Jacobi decoding, token-identical to plain greedy decoding under greedy
verification; ``Draft.probs`` is None.

MC-SJD (``coupled=True``): a window position that had a drafted (unverified) token in the last
draft keeps it when it can. With ``x`` the old token drawn from ``q_old`` and ``q_new`` the new
row, the new token is ``x`` with probability ``min(1, q_new(x) / q_old(x))``, else a draw from
``norm(max(0, q_new - q_old))``: the maximal coupling of ``q_old`` and ``q_new``, whose marginal
over ``x ~ q_old`` is ``q_new``, so the draft reports ``q_new`` and verification stays exact.
Conditioning on the history is fine: the old token at a position was drawn (by the same argument,
inductively, for coupled draws) from ``q_old`` independently of everything verification decided
at earlier positions, given the logits; the only rows that read the old token itself are rows of
*later* positions. So, given all that the verifier and the earlier positions depend on, ``x`` is
still distributed as ``q_old`` and the new token as ``q_new``. Keeping the old tokens makes
successive iterates agree more often, which raises acceptance once the distributions settle.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import ConfigError
from ...sampling import logits_to_probs, sample
from ...types import Draft, SamplingParams
from ..base import Context, StepFeedback

DEFAULT_WINDOW = 12
_TINY = torch.finfo(torch.float32).tiny


def coupled_rows(q_new: Tensor, old: Tensor, q_old: Tensor) -> Tensor:
    """The distribution of each new token given its old one under the maximal coupling.

    q_new, q_old: [k, V]; old: [k] long, the old tokens (drawn from ``q_old``), ``-1`` where there
    is none (the row is then ``q_new``). Returns [k, V]: ``kappa * onehot(x) + (1 - kappa) * r``
    with ``kappa = min(1, q_new(x) / q_old(x))`` and ``r = norm(max(0, q_new - q_old))``; its
    average over ``x ~ q_old`` is ``q_new``.
    """
    has_old = old >= 0  # [k]
    x = old.clamp_min(0)[:, None]  # [k, 1]
    qn_x = q_new.gather(1, x)  # [k, 1]
    qo_x = q_old.gather(1, x)  # [k, 1]
    keep = torch.where(qo_x > 0, (qn_x / qo_x.clamp_min(_TINY)).clamp(max=1.0), 0.0)  # [k, 1]
    rest = (q_new - q_old).clamp_min(0.0)
    z = rest.sum(dim=1, keepdim=True)
    r = torch.where(z > 0, rest / z.clamp_min(_TINY), q_new)  # [k, V]
    cond = ((1.0 - keep) * r).scatter_add(1, x, keep)  # [k, V]
    return torch.where(has_old[:, None], cond, q_new)


class JacobiSamplingDrafter:
    """SJD's drafter (module docstring); ``coupled=True`` is MC-SJD's.

    vocab_size: the target's vocabulary (the initial uniform ``q``). window: pending positions
    kept, and the most drafted per step.
    """

    def __init__(self, vocab_size: int, window: int = DEFAULT_WINDOW, coupled: bool = False,
                 name: str = "sjd") -> None:
        if window < 1:
            raise ConfigError(f"the Jacobi window (--draft-len) must be >= 1 token, got {window}")
        self.vocab_size, self.window, self.coupled, self.name = vocab_size, window, coupled, name
        self.reset()

    def reset(self) -> None:
        self.q: Tensor | None = None  # [w, V] the window's distributions (sampling)
        self.old: Tensor | None = None  # [w] long: the last draft's token there, or -1 (MC-SJD)
        self.q_old: Tensor | None = None  # [w, V] the distribution each old token came from
        self.guess: Tensor | None = None  # [w] long: the window's tokens (greedy)
        self.start = -1  # the window is valid when the context has this many tokens

    # ------------------------------------------------------------------ propose
    def propose(self, ctx: Context, budget: int) -> Draft:
        params = ctx.params or SamplingParams()
        m = int(ctx.tokens.shape[0])
        if m != self.start:  # first step, or other drafters decided tokens since we observed
            self._fresh(ctx, params)
        self.start = m
        if params.greedy:
            return Draft.chain(self.guess[: min(budget, self.guess.shape[0])])
        k = min(budget, self.q.shape[0])
        q = self.q[:k]  # [k, V]
        rows = q
        if self.coupled and self.old is not None:
            rows = coupled_rows(q, self.old[:k], self.q_old[:k])
        tokens = sample(rows, ctx.generator)  # [k]
        return Draft.chain(tokens, q)

    def _fresh(self, ctx: Context, params: SamplingParams) -> None:
        self.old = self.q_old = None
        if params.greedy:
            self.guess = ctx.tokens[-1:].repeat(self.window)
            return
        dev = ctx.generator.device if ctx.generator is not None else torch.device("cpu")
        self.q = torch.full((self.window, self.vocab_size), 1.0 / self.vocab_size, device=dev)

    # ------------------------------------------------------------------ observe
    def observe(self, ctx: Context, feedback: StepFeedback) -> None:
        if feedback.logits is None:
            raise ConfigError("speculative Jacobi decoding needs the verification's logits")
        params = ctx.params or SamplingParams()
        draft, a = feedback.draft, feedback.result.num_accepted
        n = len(draft)
        # rows a + 1 .. n predict the positions after the new root; after a full acceptance the
        # window starts from the last row (the bonus's) alone
        rows = feedback.logits[a + 1 : n + 1] if a < n else feedback.logits[n:]
        rows = rows[: self.window]  # [r, V]
        r = rows.shape[0]
        self.start = int(ctx.tokens.shape[0]) + a + 1  # the context after this step's tokens
        if params.greedy:
            guess = rows.argmax(dim=-1)  # [r]
            self.guess = torch.cat([guess, guess[-1:].repeat(self.window - r)]).cpu()
            return
        q = logits_to_probs(rows, params)  # [r, V]
        self.q = torch.cat([q, q[-1:].expand(self.window - r, -1)])  # [w, V]
        if not self.coupled or a >= n - 1 or draft.probs is None:
            self.old = self.q_old = None
            return
        # window position j had node a + 1 + j (j < n - a - 1) in this draft
        dev = q.device
        old = torch.full((self.window,), -1, dtype=torch.long, device=dev)
        q_old = torch.zeros_like(self.q)
        old[: n - a - 1] = draft.tokens[a + 1 :].to(dev)
        q_old[: n - a - 1] = draft.probs[a + 1 :].to(dev, torch.float32)
        self.old, self.q_old = old, q_old


def token_latents(model, method: str) -> Tensor:
    """``model.token_latents`` ([vocab, d]) or a one-line ConfigError saying what is needed."""
    lat = getattr(model, "token_latents", None)
    if lat is None:
        raise ConfigError(
            f"method {method} needs an image model with a VQ codebook (token_latents); "
            "this model has none"
        )
    if lat.dim() != 2 or lat.shape[0] != model.vocab_size:
        raise ConfigError(
            f"token_latents must be [vocab, d] = [{model.vocab_size}, d], got {tuple(lat.shape)}"
        )
    return lat
