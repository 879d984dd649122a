"""The stages: one package (or module) each, meeting only through streams, the status hash and the archive
table; a stage never imports another. The code map is ARCHITECTURE.md."""
