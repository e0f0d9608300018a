"""Text-to-speech as discrete audio codes (issue 20)."""
