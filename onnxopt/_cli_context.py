"""The click context every command shares (``-h`` as well as ``--help``, 100-column help)."""

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
