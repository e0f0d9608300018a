"""Text-to-speech as discrete audio codes (issue 20).

:mod:`.data` makes the training speech (documentation sentences spoken by flite), :mod:`.codec` is
the tokenizer between audio and codes, :mod:`.tokens` the transformer's ids, :mod:`.bundle` saves
and loads the trained set (the embedded one ships in ``genrefine/shipped/speech-flite``;
``genrefine train speech`` re-creates it, :mod:`genrefine.train.speech`), :mod:`.api` generates
(``genrefine.load_speech``), :mod:`.asr` and :mod:`.quality` measure, :mod:`.bench` compares
methods, :mod:`.hf` runs transformers' MusicGen with frame-level speculation.
"""
