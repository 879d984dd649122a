"""The stages: one module each, meeting only through streams and the message hash."""
