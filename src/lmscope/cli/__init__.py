"""The `lmscope` command-line tool."""
