"""Training drafters against a target model: data, prediction heads, EAGLE feature drafters.

``genrefine train heads|eagle`` (see :mod:`genrefine.train.run`) records teacher-forced passes of
the target over a corpus (:mod:`genrefine.train.record`), trains the drafter on them with
checkpoints and resume, and ends by measuring tokens per step on held-back text.
"""
