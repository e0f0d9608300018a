"""Class-conditional image generation as VQ codes (issue 19).

:mod:`.data` renders the training images (digit glyphs from bundled fonts), :mod:`.vq` is the
tokenizer between images and codes, :mod:`.classifier` and :mod:`.quality` measure generated
images, :mod:`.bundle` saves and loads the trained set (the embedded one ships in
``genrefine/shipped/image-glyphs``; ``genrefine train image`` re-creates it,
:mod:`genrefine.train.image`).
"""
