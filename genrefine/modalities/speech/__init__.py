"""Speech: text-to-speech models that emit discrete audio codes, and speculative decoding on them."""
