"""End-to-end jobs behind the command line."""
