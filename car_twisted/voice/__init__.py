"""Voice: streaming transcription, speech out, meetings and the voice sinks."""
