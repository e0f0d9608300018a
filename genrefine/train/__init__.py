"""Training drafters against a target model: prediction heads, EAGLE feature drafters and
distilled draft models.

``genrefine train heads|eagle|draft`` (:mod:`genrefine.train.run`) records teacher-forced passes
of the target over a corpus (:mod:`.corpus`, optionally with the target's own answers,
:mod:`.selfgen`; :mod:`.record`), trains the drafter with checkpoints and resume (:mod:`.loop`;
:mod:`.distill` for draft models), and ends by measuring tokens per step on held-back text.
"""
