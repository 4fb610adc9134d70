"""The dppa-stream command line (installed as dppa_stream.cli)."""
